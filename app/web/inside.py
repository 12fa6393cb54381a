"""Look inside (/inside/*): a text cut into tokens, the next-token distribution before and after
sampling, a map of the embeddings, one layer in NF4, the curves of every run. Each view is made
by inside.py; this file reads the request and picks the model."""

from typing import Annotated

import torch
from fastapi import APIRouter, Query
from pydantic import Field, create_model

from app import inside
from app.web.common import MAX_PROMPT_CHARS, Azr, Body, settings_fields, settings_from
from app.web.generation_queue import GENERATION_THREADS
from generate import SamplingConfig

MAX_TOKENIZE_CHARS = 20_000  # a page of coloured chunks; a whole book is counted through `book`
RUNS_MAX_MODELS = 4

router = APIRouter(prefix="/inside", tags=["look inside"])


class TokensRequest(Body):
    """`text` cut into tokens by `model`'s tokenizer; with `book`, also the book's numbers."""
    model: str
    text: str = Field("", max_length=MAX_TOKENIZE_CHARS)
    book: str | None = None


NextTokenRequest = create_model(
    "NextTokenRequest", __base__=Body, __doc__="The next-token distribution after `prompt`, before and after sampling.",
    model=(str, ...), adapter=(str | None, None), prompt=(str, Field("", max_length=MAX_PROMPT_CHARS)),
    bars=(int, Field(20, ge=1, le=100)), **settings_fields(SamplingConfig, skip={"max_new_tokens", "seed", "stop"}))


@router.post("/tokens", summary="A text (or a book) cut into tokens: ids, bytes per token, common tokens, longest merges")
def tokens(req: TokensRequest, azr: Azr):
    _, tok = azr.models.get(req.model)
    return inside.tokenizer_view(azr.store, tok, req.text, req.book)


@router.post("/next_token", summary="The model's next-token probabilities and what temperature/top-k/top-p make of them")
def next_token(req: NextTokenRequest, azr: Azr):
    model, tok = azr.models.get(req.model, req.adapter)
    torch.set_num_threads(GENERATION_THREADS)
    return inside.next_token_view(model, tok, req.prompt, settings_from(req, SamplingConfig), req.bars)


@router.get("/embeddings", summary="A 2-D PCA map of the embeddings of a book's commonest tokens, for any version")
def embeddings(azr: Azr, model: str, version: str | None = None, book: str | None = None,
               n: int = Query(200, ge=3, le=1000)):
    current, tok = azr.models.get(model)
    weights = azr.store.load_model(model, version=version) if version else current
    book = book or inside.default_book(azr.store, model)
    if book is None:
        raise ValueError(f"model {model!r} was trained on no book that is still uploaded: pick a book")
    counts = inside.token_counts(azr.store, tok, book)
    return {**inside.embedding_map(weights, tok, counts, n), "model": model, "version": version, "book": book}


@router.get("/nf4", summary="One layer in NF4: the 16 levels on its weights' histogram, error, bits, bytes")
def nf4(azr: Azr, model: str, layer: str | None = None):
    torch.set_num_threads(GENERATION_THREADS)
    return {**inside.nf4_view(azr.store.load_model(model), layer), "model": model}


@router.get("/runs", summary="Loss and val bits/byte curves of every run of one or more models, with settings")
def run_curves(azr: Azr, model: Annotated[list[str], Query()]):
    if len(model) > RUNS_MAX_MODELS:
        raise ValueError(f"compare at most {RUNS_MAX_MODELS} models at once")
    return inside.run_curves(azr.store, model)
