"""The web app's JSON API, one module per section of the page, each with its request and answer
schemas beside its handlers. server.py builds the app from them.

    common.py            what every router shares: the app's state (App, Azr), body bases, error schema
    page.py              the page itself, /docs, /health
    models.py            create, list, inspect, roll back, merge, delete and download models
    books.py             upload, list, read and delete books
    training.py          start, watch, stop and resume the one training job
    generation.py        /generate (whole or streamed), /attention, /arena
    inside.py            /inside/*: tokens, the next-token distribution, embeddings, NF4, run curves
    openai.py            OpenAI's API on /v1 over the same models, for other tools
    generation_queue.py  the threads every generation runs on, a bounded number at a time
    model_cache.py       each model loaded once, reloaded when its files change
    downloads.py         a model as a zip or an export, built in a temp folder and sent
    errors.py            every error as JSON {"error", "field"} with a status that says whose fault
    guard.py             the site guard: only this server's own page, curl and scripts may use it

Each handler reads its request, calls the library (store, runs, generate, inside, export) and
returns what it got. Request bodies are derived from the settings dataclasses (ModelConfig,
TrainConfig, SamplingConfig, LoRAConfig), so a field, its default and its range are defined once.
"""
