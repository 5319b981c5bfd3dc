"""recipe=add_modality: train one modality plugin against a frozen decoder; save it as its own artifact.

Reads top to bottom: frozen decoder + tokenizer (pinned) → plugin → freeze (asserted) → data (chat
examples in the serving prompt format) → task → fit (resumable) → decoder unchanged? → plugin artifact
with manifest and prompt format → held-out greedy evaluation of the saved artifact through the serving
engine (each content order) → text-only parity with the plugin on the fusion path → summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from autoglm_train.data.multimodal.datamodule import PairDataModule
from autoglm_train.data.multimodal.spec import require_data
from autoglm_train.engine.engine import Engine
from autoglm_train.errors import ConfigValueError
from autoglm_train.eval.generation import bare_decoder_tokens, evaluate, text_only_tokens
from autoglm_train.model.decoder_dir import load_decoder_dir, placeholder_ids, state_digest
from autoglm_train.model.freeze import freeze
from autoglm_train.model.manifest import load_plugin_artifact, save_plugin_artifact
from autoglm_train.model.modular import ModularLM
from autoglm_train.model.pin import PluginMismatchError, pin_decoder
from autoglm_train.model.plugin_io import load_plugin, plugin_target
from autoglm_train.model.registry import instantiate_plugin
from autoglm_train.tasks.plugin_task import PluginTask
from autoglm_train.tasks.sharding import gathered_module
from autoglm_train.tasks.summary import write_summary
from autoglm_train.tasks.trainer_factory import build_trainer, checkpoint_dir
from autoglm_train.utils.resume import resolve_ckpt_path

log = logging.getLogger(__name__)

STAGES = ("alignment", "full")
PER_ITEM = ("samples", "outputs", "output_ids", "output_logprobs")  # per-item results: heldout_outputs.jsonl


def run(cfg: DictConfig) -> dict:
    """Train ``cfg.plugin`` on ``cfg.data_mm`` against the decoder in ``cfg.decoder``; returns the run summary."""
    started = time.monotonic()
    rc = cfg.recipe
    if rc.stage not in STAGES:
        raise ConfigValueError(f"recipe.stage={rc.stage!r}; expected one of {STAGES}")
    if not cfg.get("plugin"):
        raise ConfigValueError("recipe=add_modality trains a plugin: pass plugin=vision|speech|<yours>")
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    trainer = build_trainer(cfg)  # checks precision/hardware before anything heavy

    # 1. The frozen decoder and its tokenizer, pinned (config + tokenizer + placeholder ids + weights).
    decoder, tokenizer = load_decoder_dir(cfg.decoder, rc.decoder_dtype, rc.decoder_int8)
    ids = placeholder_ids(tokenizer)
    pin = pin_decoder(cfg.decoder, ids)
    parity_before = bare_decoder_tokens(decoder, tokenizer, list(rc.parity_prompts), rc.parity_max_new_tokens)

    # 2. The plugin, projecting into this decoder's width; optionally starting from a saved artifact.
    plugin = _build_plugin(cfg.plugin, decoder.config.hidden_size, rc.init_plugin)
    model = ModularLM(decoder, ids)
    model.add_plugin(plugin)

    # 3. Freeze: the decoder always; the encoder unless stage=full. Logged, then asserted by the task.
    full = rc.stage == "full"
    counts = freeze(
        {"decoder": decoder, "encoder": plugin.encoder, "projector": plugin.projector, "gate": plugin.gate},
        {"decoder": False, "encoder": full, "projector": True, "gate": True},
    )

    # 4. Data: pairs → the plugin's preprocessing (bad items skipped and counted) → tokens.
    data = PairDataModule(instantiate(require_data(cfg.get("data_mm"), plugin.name)), plugin, tokenizer)

    # 5. Task and fit; resumes from the newest complete checkpoint when asked.
    task = PluginTask(
        model,
        plugin.name,
        tokenizer,
        instantiate(cfg.optim.optimizer),
        instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        pin.identity,
        rc.eval_max_new_tokens,
        frozen_eval=() if full else (plugin.encoder,),
    )
    decoder_before = state_digest(decoder) if rc.verify_frozen else None
    ckpt = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir(cfg))
    trainer.fit(task, datamodule=data, ckpt_path=ckpt)

    # 6. Plugin and decoder whole again on global rank 0 (ZeRO-3 / FSDP gather their shards first; every rank takes
    #    part in that), which alone checks the decoder is unchanged and writes the plugin's own artifact:
    #    plugin.json + model.safetensors + manifest.json pinning the decoder.
    plugin = gathered_module(trainer, plugin, lambda state: _rebuilt(plugin, state))
    decoder = gathered_module(trainer, decoder, lambda state: _reloaded(cfg.decoder, rc, state))
    if plugin is None or decoder is None:
        return {"recipe": "add_modality", "plugin": cfg.plugin.name, "global_rank": trainer.global_rank}
    if decoder_before is not None and state_digest(decoder) != decoder_before:
        raise RuntimeError("the frozen decoder's weights changed during training")
    artifact = save_plugin_artifact(
        plugin,
        out_dir / "plugins" / plugin.name,
        pin,
        extra={"stage": rc.stage, "global_step": trainer.global_step, "data": type(data.spec.source).__name__},
        prompt_format=data.prompt_format,
    )

    # 7. Held-out evaluation by greedy generation through the serving engine, with the artifact as a user would
    #    load it, once per trained content order; then text-only parity with the plugin built and on the fusion path.
    engine = Engine.in_process(
        decoder, tokenizer, {plugin.name: load_plugin_artifact(artifact, pin)}, {plugin.name: data.prompt_format}
    )
    budget = rc.eval_max_new_tokens or data.max_answer_tokens
    by_order = {order: evaluate(engine, data.heldout_loader(order), plugin.name, budget) for order in data.spec.orders}
    heldout = by_order[data.spec.orders[0]]
    write_heldout_outputs(out_dir / "heldout_outputs.jsonl", data.heldout_items(), by_order)
    parity_after = text_only_tokens(engine, list(rc.parity_prompts), rc.parity_max_new_tokens)

    summary = {
        "recipe": "add_modality",
        "plugin": plugin.name,
        "stage": rc.stage,
        "artifact": str(artifact),
        "decoder": str(cfg.decoder),
        "decoder_fingerprint": pin.fingerprint,
        "decoder_int8": bool(rc.decoder_int8),
        "decoder_verified_unchanged": decoder_before is not None,
        "text_only_unchanged": parity_before == parity_after,
        "params": {name: {"trainable": t, "total": n} for name, (t, n) in counts.items()},
        "global_step": trainer.global_step,
        "eval_max_new_tokens": budget,
        "resumed_from": ckpt,
        "wall_time_s": round(time.monotonic() - started, 1),
        "data_report": data.report_dict(),
        **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "heldout_order": data.spec.orders[0],
        "prompt_format": {k: v for k, v in data.prompt_format.to_dict().items() if k != "chat_template"},
        **{f"test/{k}": v for k, v in heldout.items() if k not in PER_ITEM},
        **{
            f"test/{order}/{k}": v for order, result in by_order.items() for k, v in result.items() if k not in PER_ITEM
        },
        "samples": heldout["samples"],
    }
    write_summary(out_dir / "run_summary.json", summary)
    headline = "digit_accuracy" if "digit_accuracy" in heldout else "wer"
    log.info(
        "plugin %s saved to %s | held-out %s %.4f, cer %.4f over %d items | gate %.3f | %d steps in %.0f s",
        plugin.name,
        artifact,
        headline,
        heldout[headline],
        heldout["cer"],
        heldout["items"],
        heldout[f"gate_{plugin.name}"],
        trainer.global_step,
        summary["wall_time_s"],
    )
    if not summary["text_only_unchanged"]:
        raise RuntimeError(
            f"text-only generation through the engine with plugin {plugin.name} attached differs from the bare "
            f"decoder's: {parity_after} vs {parity_before}; the plugin's fusion writes outside its placeholders"
        )
    return summary


def write_heldout_outputs(path: Path, pairs: list, by_order: dict[str, dict]) -> None:
    """Every held-out item's reference and greedy output per content order: what the served evaluation compares."""
    rows = []
    for i, pair in enumerate(pairs):
        row = {"index": i, "question": pair.question, "answer": pair.answer, "label": pair.label}
        for order, result in by_order.items():
            row[f"output_{order}"] = result["outputs"][i]
            row[f"output_ids_{order}"] = result["output_ids"][i]
            row[f"output_logprobs_{order}"] = [round(lp, 6) for lp in result["output_logprobs"][i]]
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")


def _build_plugin(plugin_cfg: DictConfig, hidden_size: int, init_plugin: str | None):
    """The plugin from its yaml, or rebuilt from an artifact (its encoder reused, e.g. for a new decoder)."""
    if init_plugin:
        plugin = load_plugin(init_plugin)  # no pin check: re-aligning to another decoder is the point
        if plugin.name != plugin_cfg.name or plugin.hidden_size != hidden_size:
            raise PluginMismatchError(
                f"recipe.init_plugin={init_plugin} holds plugin '{plugin.name}' projecting to {plugin.hidden_size}; "
                f"this run trains '{plugin_cfg.name}' for a decoder of width {hidden_size}"
            )
        log.info("plugin %s initialised from %s", plugin.name, init_plugin)
        return plugin
    plugin_cfg = OmegaConf.merge(plugin_cfg, {"hidden_size": hidden_size})  # the decoder decides the width
    return instantiate_plugin(plugin_cfg)


def _rebuilt(plugin, state: dict) -> object:
    """A fresh plugin of ``plugin``'s config holding ``state``: the whole plugin gathered from its shards."""
    fresh = instantiate_plugin({"_target_": plugin_target(plugin), **plugin.config()})
    fresh.load_state_dict(state)
    return fresh


def _reloaded(directory: str, rc: DictConfig, state: dict) -> object:
    """The decoder from ``directory`` holding ``state`` (gathered from its shards): checked, then evaluated with."""
    decoder, _ = load_decoder_dir(directory, rc.decoder_dtype, rc.decoder_int8)
    decoder.load_state_dict(state, strict=False)  # a consolidated state may leave tied weights out
    return decoder
