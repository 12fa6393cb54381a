"""The product: the lesson's pieces (model.py, tokenizer.py, azr_trainer.py, ...) put to work
as a program that keeps models and books on disk and trains them from a web page or the CLI.

Nothing in the lesson imports from here; every module here may import the lesson.

    books.py     reading a book file: any encoding, .txt/.fb2/.epub, Gutenberg's header cut off
    records.py   the schema of every JSON record read from disk: a damaged file is named, not fatal
    names.py     the one pattern every stored name follows, so a name never becomes a path
    store.py     models, versions and metrics on disk; locks, atomic writes; holds the two below
    shelf.py     the store's books (store.books): clean UTF-8 text and how each was read
    adapters.py  the LoRA adapters of a stored model (store.adapters): save, load, merge, delete
    runs.py      a training run of a stored model: books -> tokens -> Trainer -> back into the store
    jobs.py      the web app's background job: one run at a time, its log, Stop, resume after a restart
    inside.py    looking inside a model: attention, next-token candidates, NF4 error, repetition
    export.py    a model for other tools: Hugging Face folders, GGUF (llama.cpp, Ollama), PEFT adapters
    web/         the web app: one router per tab of the page, and OpenAI's API on /v1 (its own map)

The edges use it: server.py (the web page and its API), cli.py (the `azr` command) and the
benchmarks. Read the lesson first (README: "Read the code in this order"); come here to see how
a trainer becomes a program that loses nothing.
"""
