"""Orbax checkpoints of the training state: save every N steps, keep the last k, restore onto any mesh.

What is saved: the trainable params (LoRA adapters only, for LoRA methods), the optimizer state, the step and the
PRNG key -- plus a JSON ``extra`` item (data-iterator state, the base model reference, the config). The frozen params
are never saved: they are the base model's weights, reloaded from ``extra["base_model"]`` (for ``sft-selfaug`` the
frozen copy *is* the original model too).

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` leaves carrying the target ``sharding``), so a
checkpoint written on 8 devices restores onto 1 or 4 with the target layout, not the saved one. Checkpoints are
written collectively by every process (Orbax coordinates multi-host writes).

Faults: Orbax writes each step into ``N.orbax-checkpoint-tmp-*`` and renames it to ``N`` only when complete, so a
process killed mid-save (``kill -9``) leaves the previous step as the latest restorable one
(``tests/test_checkpoint_faults.py``). A step folder that exists but cannot be read back raises
:class:`CheckpointRestoreError` naming the folder and the fix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


class CheckpointRestoreError(ValueError):
    """A checkpoint directory that is missing or cannot be restored (the message names the path)."""


def savable_state(state) -> dict[str, Any]:
    """The parts of a :class:`~selfaug_jax.train.state.TrainState` that a checkpoint holds."""
    return {"trainable": state.trainable, "opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for a train state + JSON extras.

    Args:
        directory: where step folders are written (created).
        max_to_keep: keep the newest ``max_to_keep`` checkpoints.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, extra: dict[str, Any]) -> None:
        """Save ``state`` (a TrainState) at ``step`` with the JSON ``extra``; waits until it is on disk."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(savable_state(state)), extra=ocp.args.JsonSave(extra)
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        logger.info("saved checkpoint step %d to %s", step, self.directory)

    def restore(self, state_template, step: int | None = None):
        """Restore into the shapes/shardings of ``state_template`` (a TrainState); returns ``(state, extra)``.

        ``state_template`` is typically a freshly initialised state on the *target* mesh; its frozen params are
        kept as they are.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointRestoreError(f"no checkpoint in {self.directory}")
        target = abstract_like(savable_state(state_template))
        step_dir = self.directory / str(int(step))
        try:
            restored = self._manager.restore(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()),
            )
        except Exception as e:  # noqa: BLE001  (Orbax / TensorStore raise many types for unreadable files)
            first = " ".join(str(e).split())[:300]
            raise CheckpointRestoreError(
                f"checkpoint {step_dir} cannot be restored ({type(e).__name__}: {first}); it is corrupted or was "
                f"written for a different model/method; delete {step_dir} to resume from the previous step, or "
                "start without --resume"
            ) from e
        if restored.extra is None or restored.state is None:
            raise CheckpointRestoreError(f"checkpoint {step_dir} is incomplete (no state or extra item); delete it")
        saved = restored.state
        state = state_template.replace(
            trainable=saved["trainable"], opt_state=saved["opt_state"], step=saved["step"], rng=saved["rng"]
        )
        return state, dict(restored.extra)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
