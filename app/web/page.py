"""The page (templates/index.html and the ES modules in static/, which use exactly this API),
the API's docs at /docs (Swagger UI's files from the fastapi-offline package: no CDN), and
/health."""

from dataclasses import fields
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.templating import Jinja2Templates

import config
from app.web.common import Answer, Azr
from app.web.training import SERVER_CHOOSES
from azr_trainer import TrainConfig
from generate import SamplingConfig
from app.jobs import ACTIVE, RESUMABLE
from lora import TARGETS, LoRAConfig
from model import PRESETS, ModelConfig
from app.books import LANGUAGE_NAMES

ROOT = Path(__file__).resolve().parents[2]  # the project folder (installed: site-packages), beside templates/

router = APIRouter()
templates = Jinja2Templates(directory=ROOT / "templates")


class Health(Answer):
    ok: bool
    device: str
    models: int
    books: int
    job: str
    generating: int
    max_upload_bytes: int
    damaged: list[str]  # models, books and job files that cannot be read (names)
    damaged_books: list[str]
    damaged_jobs: list[str]


@router.get("/", include_in_schema=False)
def index(request: Request, azr: Azr):
    return templates.TemplateResponse(request, "index.html", {"page": page_data(azr)})


def page_data(azr):
    """What the page needs before its first request: presets, every form field's default,
    range, choices, kind and help (from the settings dataclasses), which training fields the
    page offers, the job states, the languages a book can be in, the upload limit."""
    def specs(cls):
        return {f.name: {"default": config.default_of(f), "lo": f.metadata["lo"], "hi": f.metadata["hi"],
                         "choices": f.metadata["choices"], "kind": config.field_type(cls, f)[0].__name__,
                         "help": f.metadata["help"]} for f in fields(cls)}
    return {"presets": {k: v.to_dict() for k, v in PRESETS.items()}, "model": specs(ModelConfig),
            "train": specs(TrainConfig), "sampling": specs(SamplingConfig), "lora": specs(LoRAConfig),
            "train_offered": [f.name for f in fields(TrainConfig) if f.name not in SERVER_CHOOSES],
            "lora_targets": TARGETS, "max_upload_bytes": azr.max_upload_bytes,
            "job_states": {"active": ACTIVE, "resumable": RESUMABLE}, "languages": LANGUAGE_NAMES}


@router.get("/docs", include_in_schema=False)
def docs():
    """Swagger UI from the pip package's files, so the docs work offline."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="AZR Model Trainer API",
                               swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css",
                               swagger_favicon_url="/docs-assets/favicon.png")


@router.get("/health", summary="Server is up: device, counts, job state, generations running or waiting; the "
                               "models, books and job files that are damaged", response_model=Health)
def health(azr: Azr):
    models, books = azr.store.list_models(), azr.store.books.list()
    return {"ok": True, "device": str(azr.device), "models": len(models),
            "damaged": [m["name"] for m in models if "damaged" in m],
            "books": len(books), "damaged_books": [b["name"] for b in books if "damaged" in b],
            "damaged_jobs": [j["name"] for j in azr.jobs.damaged], "job": azr.jobs.status()["state"],
            "generating": azr.generation.taken, "max_upload_bytes": azr.max_upload_bytes}
