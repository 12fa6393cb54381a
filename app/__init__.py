"""The product around the lesson: what turns the model and its training loop into an app.

    web/    the web app's routers, one per tab of the page, and OpenAI's API on /v1 (server.py serves them)
"""
