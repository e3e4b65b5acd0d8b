"""``selfaug-lm-eval``: lm-evaluation-harness's own command line with the ``selfaug-jax`` model registered.

lm-eval 0.4.13 looks models up only in its in-process registry (no entry-point discovery), so a model defined
outside its source tree must be imported before the CLI runs. This does exactly that and hands over to
``lm_eval.__main__.cli_evaluate``; every lm-eval argument works unchanged::

    selfaug-lm-eval --model selfaug-jax --model_args pretrained=smollm2-135m-instruct,dtype=bfloat16 \
        --tasks arc_easy --batch_size 8
    python -m selfaug_jax.eval.lm_eval_cli run --model selfaug-jax --model_args pretrained=runs/smoke ...
"""

from __future__ import annotations

import sys


def main() -> None:
    """Register ``selfaug-jax`` with lm-eval, then run lm-eval's CLI on ``sys.argv``."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise SystemExit("error: lm-eval is not installed; pip install 'selfaug-jax[lm-eval]' "
                         "(or pip install -r requirements-lm-eval.txt)") from None
    from selfaug_jax.eval.lm_eval_backend import BackendError  # importing registers the model

    try:
        cli_evaluate()
    except BackendError as e:  # bad model_args, path or request: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
