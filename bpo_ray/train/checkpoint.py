"""Checkpoints of a training run, and where a restarted run resumes.

A checkpoint (a Ray Train checkpoint directory in ``OUT/checkpoints/``) holds DeepSpeed's engine
state (``deepspeed/``, tag ``DS_TAG``: LoRA weights and one optimizer shard per rank), the
consolidated PEFT adapter (``adapter/``) and ``state.json`` (``TrainState``: step, data position,
schedule, world size).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from bpo_ray import storage
from bpo_ray.train.collectives import broadcast
from bpo_ray.train.data import DataPosition
from bpo_ray.train.lora import set_base_model_uri

DS_TAG = "state"
CHECKPOINTS_DIR = "checkpoints"  # the Ray Train run name: checkpoints live in OUT/checkpoints/


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    world_size: int = 0
    scheduler: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        data["position"] = DataPosition(**data["position"])
        return cls(**data)


def save_adapter(policy, out_dir: str, rank: int, zero_stage: int, base_model_uri: str) -> None:
    """Consolidated PEFT adapter (safetensors) written by rank 0; ZeRO-3 gathers the shards first,
    so every rank must call this."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    with gathered:
        if rank == 0:
            policy.save_pretrained(out_dir, safe_serialization=True)
            set_base_model_uri(out_dir, base_model_uri)


def load_adapter_weights(policy, adapter_dir: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(policy, load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))


def checkpoint_step(fs, path: str) -> Optional[int]:
    try:
        with fs.open_input_stream(f"{path}/state.json") as f:
            return TrainState.from_json(f.read().decode()).step
    except (OSError, ValueError, KeyError, TypeError):
        return None


def download_dir(fs, path: str, local_dir: str) -> None:
    """Copy the checkpoint at ``path`` on ``fs`` (local or S3) into ``local_dir``."""
    import pyarrow.fs as pafs

    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def checkpoint_dirs(out_uri: str) -> dict[str, list[str]]:
    """The checkpoint directories in ``out/checkpoints`` and the files in each (relative paths)."""
    root = storage.join(out_uri, CHECKPOINTS_DIR)
    by_dir: dict[str, list[str]] = {}
    for f in storage.list_files(root):
        rel = f[len(root) + 1:]
        if rel.startswith("checkpoint_") and "/" in rel:
            by_dir.setdefault(rel.split("/", 1)[0], []).append(rel.split("/", 1)[1])
    return by_dir


def complete_checkpoints(out_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every checkpoint in ``out/checkpoints`` whose every part arrived:
    ``state.json``, the adapter, and one ZeRO optimizer shard per rank of the run that wrote it;
    oldest step first."""
    found = []
    for name, parts in checkpoint_dirs(out_uri).items():
        uri = storage.join(out_uri, CHECKPOINTS_DIR, name)
        if "state.json" not in parts or "adapter/adapter_model.safetensors" not in parts:
            continue
        try:
            state = TrainState.from_json(storage.read_text(storage.join(uri, "state.json")))
        except (storage.StorageError, ValueError, KeyError, TypeError):
            continue
        shards = [p for p in parts if p.startswith("deepspeed/") and p.endswith("_optim_states.pt")]
        if len(shards) == state.world_size:
            found.append((state.step, uri))
    return sorted(found)


def latest_complete_checkpoint(out_uri: str) -> Optional[tuple[int, str]]:
    """``(step, uri)`` of the newest complete checkpoint (``complete_checkpoints``).

    Ray Train only hands a restarted worker group the checkpoints its controller had registered;
    a worker killed right after uploading one can beat that registration. The files are already
    in storage then, so looking there as well makes the resume point the real latest one (and
    with ``train.launcher: local`` storage is the only place a rerun finds them).
    """
    complete = complete_checkpoints(out_uri)
    return complete[-1] if complete else None


def resume_point(checkpoint, out_uri: str, rank: int) -> Optional[tuple[str, Any, str]]:
    """``(source, filesystem, path)`` of the checkpoint to resume from, decided by rank 0 (so all
    ranks restore the same one): Ray Train's latest, or a newer complete one found in storage."""
    choice = None
    if rank == 0:
        candidates = []
        if checkpoint is not None:
            candidates.append((checkpoint_step(checkpoint.filesystem, checkpoint.path) or -1, "ray",
                               checkpoint.path))
        found = latest_complete_checkpoint(out_uri)
        if found is not None:
            candidates.append((found[0], "storage", storage.filesystem(found[1])[1]))
        if candidates:
            step, source, path = max(candidates, key=lambda c: (c[0], c[1] == "ray"))
            choice = (source, path)
    choice = broadcast(choice)
    if choice is None:
        return None
    return choice[0], storage.filesystem(out_uri)[0], choice[1]


def persist_checkpoint(local_dir: str, out_uri: str, step: int, rank: int, keep: int) -> str:
    """``train.launcher: local``: what Ray Train's checkpoint upload does for the ``ray_train``
    launcher. Every rank copies its part of the checkpoint (``local_dir``) to
    ``OUT/checkpoints/checkpoint_step-<step>``; once all have, rank 0 deletes the older checkpoints
    beyond the newest ``keep`` complete ones (``CheckpointConfig.num_to_keep``). Returns the uri."""
    import torch.distributed as dist

    uri = storage.join(out_uri, CHECKPOINTS_DIR, f"checkpoint_step-{step:08d}")
    storage.upload_dir(local_dir, uri)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        complete = complete_checkpoints(out_uri)
        if len(complete) >= keep:
            oldest_kept = complete[-keep][0]
            root = storage.join(out_uri, CHECKPOINTS_DIR)
            for name in checkpoint_dirs(out_uri):
                found = checkpoint_step(*storage.filesystem(storage.join(root, name)))
                if found is None or found < oldest_kept:  # older, or never completed
                    storage.delete(storage.join(root, name))
    return uri
