"""Models: create one from a preset or numbers, list them, look at one (runs, versions, adapters,
metrics, a self-play rollout, a probe of its step time), roll back, merge an adapter, delete,
and download it in this app's format or exported for other tools."""

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
import pydantic
from pydantic import Field

import config
from app import export
from app import inside
from app import runs
from app.web.common import Answer, Azr, Body, Damaged, settings_fields
from app.web.downloads import build_adapter_zip, build_export, build_model_zip, send_built
from azr_trainer import TrainConfig
from files import CorruptFile, NotFound
from app.jobs import Busy
from model import PRESETS, ModelConfig
from sizing import flops_per_token, memory_estimate, param_count

router = APIRouter(tags=["models"])


# ----------------------------------------------------------------------------- schemas

CreateModelRequest = pydantic.create_model(
    "CreateModelRequest", __base__=Body, __doc__="A preset, or the config numbers; numbers given next to a preset override it.",
    name=(str, ...), preset=(Literal[tuple(PRESETS)] | None, None),
    seed=(int, Field(0, json_schema_extra={"minimum": 0, "maximum": config.SEED_MAX})),  # checked by the store
    **{k: (v[0] | None, None) for k, v in settings_fields(ModelConfig).items()})


class RollbackRequest(Body):
    version: str


class MergeRequest(Body):
    """A new model `out`: `model` with its LoRA `adapter` merged into the weights."""
    model: str
    adapter: str
    out: str


class ModelInfo(Answer):
    name: str
    config: dict[str, Any]
    params: int
    size_bytes: int
    steps: int
    best_val_bpb: float | None
    parent: str | dict[str, str] | None
    books: list[dict[str, str]]
    versions: list[dict[str, Any]]
    created: str
    has_tokenizer: bool
    adapters: list[Any]


class ModelDetail(ModelInfo):
    runs: list[dict[str, Any]]
    training: bool


DOWNLOADED = {200: {"content": {"application/zip": {}, "application/octet-stream": {}}, "description": "the file"}}


# ----------------------------------------------------------------------------- handlers


@router.get("/estimate", summary="Parameter count and training memory of a config (live form check)")
def estimate(vocab_size: int = ModelConfig.vocab_size, d_model: int = ModelConfig.d_model,
             num_layers: int = ModelConfig.num_layers, num_heads: int = ModelConfig.num_heads,
             d_ff: int = ModelConfig.d_ff, max_seq_len: int = ModelConfig.max_seq_len,
             batch_size: int = TrainConfig.batch_size, optimizer: str = TrainConfig.optimizer):
    cfg = ModelConfig(vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_len).validate()
    TrainConfig(batch_size=batch_size, optimizer=optimizer).validate()
    return {"params": param_count(cfg), "memory": memory_estimate(cfg, batch_size, optimizer=optimizer),
            "flops_per_token": flops_per_token(cfg), "batch_size": batch_size, "optimizer": optimizer}


@router.post("/create_model", status_code=201, summary="Create a model from a preset or the config numbers",
             response_model=ModelInfo)
def create_model(req: CreateModelRequest, azr: Azr):
    base = PRESETS[req.preset].to_dict() if req.preset else ModelConfig().to_dict()
    given = req.model_dump(exclude={"name", "preset", "seed"}, exclude_none=True)
    azr.store.create_model(req.name, ModelConfig.from_dict({**base, **given}), seed=req.seed)
    return azr.store.info(req.name)


@router.get("/models", summary="All models: params, size on disk, steps, best val bits/byte, lineage "
                               "(a model whose files cannot be read: {name, damaged})",
            response_model=list[ModelInfo | Damaged])
def list_models(azr: Azr):
    return azr.store.list_models()


@router.get("/models/{name}", summary="One model: info, runs, versions, adapters", response_model=ModelDetail)
def model_info(name: str, azr: Azr):
    info = azr.store.info(name)
    adapters = [adapter_or_damaged(azr.store, name, a) for a in info["adapters"]]
    return {**info, "adapters": adapters, "runs": azr.store.lineage(name)["runs"], "training": azr.jobs.is_active(name)}


def adapter_or_damaged(store, name, adapter):
    try:
        return store.adapters.info(name, adapter)
    except CorruptFile as e:
        return {"name": adapter, "damaged": str(e)}


@router.get("/models/{name}/metrics", summary="Rows of metrics.jsonl from line `since`, optionally one run or adapter")
def model_metrics(name: str, azr: Azr, since: int = Query(0, ge=0), run: str | None = None, adapter: str | None = None):
    rows = azr.store.metrics(name, since, adapter)
    # a resume rewrites the file without the steps it redoes, so `since` can point past its end:
    # then the client starts over from line 0
    reset = not rows and since > 0 and len(azr.store.metrics(name, 0, adapter)) < since
    if reset:
        rows = azr.store.metrics(name, 0, adapter)
    return {"rows": [r for r in rows if run is None or r.get("run") == run],
            "next": (0 if reset else since) + len(rows), "reset": reset}


@router.get("/models/{name}/step_time", summary="Time per training step on this machine: a probe of a few steps")
def step_time(name: str, azr: Azr, batch_size: int = TrainConfig.batch_size, seq_len: int = TrainConfig.seq_len,
              grad_accum: int = TrainConfig.grad_accum, steps: int = TrainConfig.steps,
              minutes: float = TrainConfig.minutes, precision: str = TrainConfig.precision,
              compile: str = TrainConfig.compile):
    if azr.jobs.is_active():  # the probe would slow the run down, and the run would slow the probe
        raise Busy("a training job is running: the time estimate waits for it to end")
    tc = TrainConfig(steps=steps, minutes=minutes, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                     precision=precision, compile=compile, device=str(azr.device))
    return runs.step_time(azr.store, name, tc.validate())


@router.get("/models/{name}/selfplay_example", summary="The latest self-play rollout: the tokens it wrote and the repeats it pushed down")
def selfplay_example(name: str, azr: Azr, adapter: str | None = None):
    rows = [r for r in azr.store.metrics(name, 0, adapter) if "example" in r.get("selfplay", {})]
    tok = azr.store.tokenizer(name)
    if not rows or tok is None:
        raise NotFound(f"model {name!r} has no self-play steps yet: train it with self-play on")
    return {"step": rows[-1]["step"], "run": rows[-1]["run"], **inside.selfplay_rollout(rows[-1]["selfplay"]["example"], tok)}


@router.delete("/models/{name}", summary="Delete a model, its versions and checkpoints")
def delete_model(name: str, azr: Azr):
    refuse_while_training(azr.jobs, name, "delete")
    azr.store.delete_model(name)
    azr.models.forget(name)
    return {"deleted": name}


@router.delete("/models/{name}/adapters/{adapter}", summary="Delete one LoRA adapter of a model")
def delete_adapter(name: str, adapter: str, azr: Azr):
    refuse_while_training(azr.jobs, name, "delete an adapter of")
    azr.store.adapters.delete(name, adapter)
    azr.models.forget(name)
    return {"deleted": adapter, "model": name}


@router.post("/models/{name}/rollback", summary="Make a saved version the current weights", response_model=ModelInfo)
def rollback(name: str, req: RollbackRequest, azr: Azr):
    refuse_while_training(azr.jobs, name, "roll back")
    azr.store.rollback(name, req.version)
    return azr.store.info(name)


def refuse_while_training(jobs, name, what):
    if jobs.is_active(name):
        raise Busy(f"cannot {what} model {name!r} while it is training; stop the job first")


@router.post("/merge", status_code=201, summary="Merge a LoRA adapter into a new model", response_model=ModelInfo)
def merge(req: MergeRequest, azr: Azr):
    azr.store.adapters.merge(req.model, req.adapter, req.out)
    return azr.store.info(req.out)


@router.get("/download_model/{name}", response_class=FileResponse, responses=DOWNLOADED,
            summary="The model as this app's zip, a Hugging Face folder (zip), a GGUF file for llama.cpp, "
                    "or that GGUF with its Ollama Modelfile (zip)")
def download_model(name: str, azr: Azr, format: Literal["native", "hf", "gguf", "ollama"] = "native",
                   dtype: Literal[tuple(export.DTYPES)] = Query("f32", description="hf, gguf, ollama: f32, f16, "
                                                                                   "q8_0 (not hf)")):
    if format == "native":
        return send_built(lambda tmp: build_model_zip(azr.store, name, tmp), f"{name}.zip", azr.store, name)
    filename = f"{name}-{dtype}.gguf" if format == "gguf" else f"{name}-{format}.zip"
    return send_built(lambda tmp: build_export(azr.store, name, format, dtype, None, tmp), filename, azr.store, name)


@router.get("/download_adapter/{name}/{adapter}", response_class=FileResponse, responses=DOWNLOADED,
            summary="A LoRA adapter as this app's zip or a PEFT folder (zip)")
def download_adapter(name: str, adapter: str, azr: Azr, format: Literal["native", "peft"] = "native",
                     dtype: Literal["f32", "f16"] = "f32"):
    if format == "native":
        return send_built(lambda tmp: build_adapter_zip(azr.store, name, adapter, tmp), f"{adapter}.zip",
                          azr.store, name, adapter)
    return send_built(lambda tmp: build_export(azr.store, name, format, dtype, adapter, tmp), f"{adapter}-{format}.zip",
                      azr.store, name, adapter)
