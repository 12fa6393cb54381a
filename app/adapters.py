"""The store's LoRA adapters: small corrections trained on top of one stored model.

    <home>/models/<name>/adapters/<adapter>/adapter.safetensors   A and B of every wrapped layer
                                            adapter_config.json   the LoRAConfig, the run, base_sha256
                                            metrics.jsonl         its fine-tune, step by step

An adapter lives inside its model's folder and under its model's lock (store.py): deleting the
model deletes its adapters, and no change to one interleaves with a change to the other. It
records the sha256 of the exact base weights it was trained on (LoRA, Hu et al. 2021: the
adapter learns a low-rank ΔW = BA for one W), and is refused on any other weights.
"""

import shutil
from dataclasses import replace

from files import CorruptFile, NotFound, StoreError, load_tensors, load_weights, save_tensors, weights_of, write_json
from lora import LoRAConfig, attach_lora, count_params, merge_lora

from app import records
from app.names import check_name


class Adapters:
    def __init__(self, store):
        self.store = store  # the models the adapters belong to, and their locks

    def dir(self, name, adapter, must_exist=True):
        """models/<name>/adapters/<adapter>/: adapter.safetensors + adapter_config.json (lora.py)."""
        d = self.store.model_dir(name) / "adapters" / check_name(adapter, "adapter")
        if must_exist and not (d / "adapter_config.json").exists():
            raise NotFound(f"model {name!r} has no adapter {adapter!r}; its adapters: {self.list(name)}")
        return d

    def list(self, name):
        d = self.store.model_dir(name) / "adapters"
        return sorted(p.parent.name for p in d.glob("*/adapter_config.json")) if d.exists() else []

    def save(self, name, adapter, model, lc, base_sha256, run=None):
        """adapters/<adapter>/adapter.safetensors (A and B of every wrapped layer) + adapter_config.json,
        written last: its presence marks a complete adapter."""
        info = {"name": adapter, "base_model": name, "base_sha256": base_sha256, "lora": lc.to_dict(),
                "params": count_params(model), "run": run, "saved": records.now()}
        with self.store.locked(name):
            d = self.dir(name, adapter, must_exist=False)
            d.mkdir(parents=True, exist_ok=True)
            adapter_weights = weights_of(model, trainable_only=True)  # A and B of every wrapped layer
            save_tensors(d / "adapter.safetensors", adapter_weights, {"base_sha256": base_sha256})
            write_json(d / "adapter_config.json", info)
        return info

    def info(self, name, adapter):
        try:
            return records.load(self.dir(name, adapter) / "adapter_config.json", records.AdapterConfig)
        except CorruptFile as e:
            raise CorruptFile(f"{e}; delete the adapter (`python cli.py delete {name} --adapter {adapter}`) and "
                              f"fine-tune it again") from None

    def load(self, name, adapter, device="cpu", nf4=None):
        """The base model `name` with its saved adapter attached, in eval mode.

        nf4=None rebuilds the base as it was during training (NF4 for a QLoRA adapter); False/True
        force a full-precision or NF4 base. Refuses an adapter trained on other base weights."""
        info = self.info(name, adapter)
        self.check_base(name, info)
        lc = LoRAConfig.from_dict(info["lora"])
        model = attach_lora(self.store.load_model(name, device), lc if nf4 is None else replace(lc, nf4=nf4))
        tensors, _ = load_tensors(self.dir(name, adapter) / "adapter.safetensors")
        load_weights(model, tensors, trainable_only=True)
        return model.eval()

    def check_base(self, name, info):
        """An adapter is a correction to one exact set of base weights: anything else is refused."""
        if info["base_model"] != name:
            raise StoreError(f"adapter {info['name']!r} was trained on model {info['base_model']!r}, not {name!r}")
        current = self.store.weights_sha256(name)
        if info["base_sha256"] != current:
            raise StoreError(
                f"adapter {info['name']!r} was trained on other weights of {name!r} (sha256 "
                f"{info['base_sha256'][:12]}, now {current[:12]}): the model was trained further or rolled "
                f"back since. Roll it back to the version the adapter was trained on, or fine-tune again.")

    def merge(self, name, adapter, out):
        """A new model `out` = base `name` with `adapter` merged in; copies the tokenizer, and its
        lineage records parent {model, adapter}.

        A QLoRA adapter is merged into the full-precision base weights W, not into NF4(W): it was
        trained against NF4(W), so the merged model differs from what it learned with by the
        quantization error of W (see quant.nf4_report), but it stays a full-precision model."""
        info = self.info(name, adapter)
        model = merge_lora(self.load(name, adapter, nf4=False))
        base, run = self.store.lineage(name), info.get("run") or {}
        self.store.create_model(out, model.config, parent={"model": name, "adapter": adapter}, model=model,
                                tokenizer=self.store.tokenizer(name),
                                books=records.merge_books(base["books"], run.get("books", [])),
                                steps=base["steps"] + run.get("steps", 0))
        return self.store.lineage(out)

    def delete(self, name, adapter):
        with self.store.locked(name), self.store.training(name):
            d = self.dir(name, adapter)
            (d / "adapter_config.json").unlink()  # first: a half-deleted adapter no longer counts
            shutil.rmtree(d)
            shutil.rmtree(self.store.checkpoint_dir(name) / "adapters" / adapter, ignore_errors=True)
