"""The resume folder of a layer-by-layer run (GPTQ, calibration).

A run that goes through a model one decoder layer at a time keeps, beside its output, a folder
with ``state.json`` (what makes the run this run: model, samples, options, qtool version; how
many layers are done), one safetensors file of results per finished layer, and, every few
layers, a checkpoint of the hidden states entering the next one (one file per batch, so a big
cache is never in memory at once; sized so that a 70B model does not write 80 copies of its
activations). Every file is written under a temporary name and renamed, ``state.json`` last, so
a run killed at any moment leaves a consistent folder. Resuming reloads the last hidden-state
checkpoint and recomputes the layers after it from their saved results.

Under torchrun (``world``) only rank 0 reads and writes the folder, which may be on its machine
alone: the other ranks get its state, send it their hidden states for each checkpoint, and on
resume receive theirs and the saved results they need. Hidden-state files are numbered by batch
among all, so a run resumes with any number of processes."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch

from qtool.errors import BadInputError, OutputError
from qtool.io import atomic_dir, first_difference, save_tensors, write_text
from qtool.runner.dist import World
from qtool.runner.stash import Stash

STATE = "state.json"
WORK_VERSION = 2
# hidden states are checkpointed every k layers, k such that the layers between two checkpoints
# carry about this many bytes of them: a small model checkpoints after every layer, a 70B model
# with 128 x 2048 tokens (4.3 GB per layer in bfloat16) every 5th; a resumed run recomputes the
# few layers since the last checkpoint from their saved results
CHECKPOINT_BYTES = 1 << 30


def checkpoint_every(session: Any, explicit: int | None = None) -> int:
    """Layers between two hidden-state checkpoints (``QTOOL_CHECKPOINT_EVERY`` overrides)."""
    if explicit is not None:
        return max(1, explicit)
    env = os.environ.get("QTOOL_CHECKPOINT_EVERY")
    if env:
        return max(1, int(env))
    from qtool.models.spec import ModelSpec

    hidden = ModelSpec.from_config(session.ckpt.config).hidden  # text_config of multimodal too
    nbytes = session.tokens * hidden * session.dtype.itemsize
    return max(1, math.ceil(nbytes / CHECKPOINT_BYTES))


class WorkFolder:
    """Per-layer results, hidden-state checkpoints and ``state.json``."""

    kind: ClassVar[str] = "qtool"  # named in the messages ("an interrupted GPTQ run")

    def __init__(self, path: Path, run: dict[str, Any], world: World | None = None) -> None:
        self.path = path
        self.run = run
        self.world = world if world is not None else World()
        self.layers_done = 0
        self.hidden_at = 0  # the layer whose input hidden states the folder holds
        self.reports: list[dict[str, Any]] = []

    @classmethod
    def open(
        cls, path: Path, run: dict[str, Any], *, resume: bool, world: World | None = None
    ) -> Any:
        """The folder for ``run`` (new, or ``resume``-d); under torchrun rank 0 opens it and
        the others get its state (or its error)."""
        w = world if world is not None else World()
        if not w.active:
            return cls._open(path, run, resume=resume)
        opened = w.on_main(
            lambda: cls._open(path, run, resume=resume),
            share=lambda wf: [wf.layers_done, wf.hidden_at, wf.reports],
        )
        if w.is_main:
            opened.world = w
            return opened
        work = cls(path, run, w)
        work.layers_done, work.hidden_at, work.reports = opened
        return work

    @classmethod
    def _open(cls, path: Path, run: dict[str, Any], *, resume: bool) -> Any:
        work = cls(path, run)
        state_file = path / STATE
        if not state_file.exists():
            if path.exists() and any(path.iterdir()):
                raise BadInputError(
                    f"{path}: not an empty directory and not a qtool {cls.kind} run",
                    hint="pass an empty or new directory to --resume",
                )
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{path}: cannot create the work directory ({e.strerror})") from e
            return work
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(
                f"{state_file}: unreadable ({e})", hint="delete the directory"
            ) from e
        if not resume:
            raise BadInputError(
                f"{path} holds an interrupted {cls.kind} run "
                f"({state.get('layers_done', 0)} layers done)",
                hint=f"continue it with --resume {path}, or delete the directory",
            )
        diff = first_difference(state.get("run", {}), run)
        if diff:
            raise BadInputError(
                f"--resume {path}: that directory is from another run (differs in {diff})",
                hint="rerun with the options of the interrupted run, or use a new directory",
            )
        work.layers_done = int(state["layers_done"])
        work.hidden_at = int(state.get("hidden_at", 0))
        work.reports = list(state.get("reports", []))
        return work

    def stash_folder(self) -> Path:
        """Where disk-placed caches go (one folder per rank under torchrun)."""
        w = self.world
        return self.path / "stash" / f"rank{w.rank}" if w.active else self.path / "stash"

    def layer_file(self, i: int) -> Path:
        return self.path / f"layer_{i:04d}.safetensors"

    def hidden_dir(self, i: int) -> Path:
        return self.path / f"hidden_{i:04d}"

    def save(
        self,
        i: int,
        tensors: dict[str, torch.Tensor],
        reports: list[dict[str, Any]],
        hidden: Stash | None,
    ) -> None:
        """Layer ``i``'s results; with ``hidden``, a checkpoint of the hidden states entering
        layer ``i + 1``. ``state.json`` goes last. Under torchrun every rank calls this with the
        same results and its own hidden states; rank 0 writes them all."""
        world = self.world
        if world.is_main:
            save_tensors({k: t.contiguous() for k, t in tensors.items()}, self.layer_file(i))
        old = self.hidden_at
        if hidden is not None:
            if not world.is_main:  # rank 0 writes every rank's batches, in order
                world.send_bytes(str(len(hidden)).encode(), 0)
                for j in range(len(hidden)):
                    world.send_tensor(hidden[j], 0)
            else:
                with atomic_dir(self.hidden_dir(i + 1)) as tmp:
                    meta: list[dict[str, Any]] = []
                    for r in range(world.size):
                        n = len(hidden) if r == 0 else int(world.recv_bytes(r))
                        for j in range(n):
                            t = hidden[j] if r == 0 else world.recv_tensor(r)
                            t = t.detach().to("cpu").contiguous()
                            (tmp / f"{len(meta):06d}.bin").write_bytes(
                                t.reshape(-1).view(torch.uint8).numpy().tobytes()
                            )
                            meta.append({"shape": list(t.shape), "dtype": str(t.dtype)})
                    (tmp / "meta.json").write_text(json.dumps(meta))
            self.hidden_at = i + 1
        self.layers_done = i + 1
        self.reports.extend(reports)
        if not world.is_main:
            return
        state = {
            "version": WORK_VERSION,
            "run": self.run,
            "layers_done": self.layers_done,
            "hidden_at": self.hidden_at,
            "reports": self.reports,
        }
        write_text(self.path / STATE, json.dumps(state, indent=1))
        if hidden is not None and old != self.hidden_at:
            shutil.rmtree(self.hidden_dir(old), ignore_errors=True)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.layer_file(i)))

    def shared_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s saved results on every rank (rank 0 reads the file and sends its
        bytes)."""
        if not self.world.active:
            return self.layer_tensors(i)
        from safetensors.torch import load

        data = self.layer_file(i).read_bytes() if self.world.is_main else None
        return load(self.world.broadcast_bytes(data))

    def load_hidden(self, into: Stash, shards: list[range] | None = None) -> Stash:
        """The checkpointed hidden states (entering layer ``hidden_at``), batch by batch: this
        rank's share of them (``shards``: every rank's batches; rank 0 reads and sends)."""
        into.clear()
        world = self.world
        if not world.is_main:
            assert shards is not None
            for _ in shards[world.rank]:
                into.append(world.recv_tensor(0))
            return into
        folder = self.hidden_dir(self.hidden_at)
        meta = json.loads((folder / "meta.json").read_text())
        owner = {j: r for r, sh in enumerate(shards or [range(len(meta))]) for j in sh}
        for j, m in enumerate(meta):
            dtype = getattr(torch, m["dtype"].removeprefix("torch."))
            data = bytearray((folder / f"{j:06d}.bin").read_bytes())
            t = torch.frombuffer(data, dtype=dtype).reshape(m["shape"])
            if owner.get(j, 0) == 0:
                into.append(t)
            else:
                world.send_tensor(t, owner[j])
        return into
