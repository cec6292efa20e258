"""`import prefopt` and the pure-loss modules must not pull in transformers or peft (issue: foundation, item 7)."""

import subprocess
import sys

import pytest

HEAVY = ("transformers", "peft")


def _imported_after(code: str) -> set[str]:
    script = (
        code
        + f"\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_import_prefopt_is_light():
    assert _imported_after("import prefopt") == set()


def test_loss_registry_and_pure_modules_are_light():
    code = (
        "import prefopt as po\n"
        "po.available_losses()\n"
        "import prefopt.masked, prefopt.types, prefopt.registry\n"
        "import importlib, importlib.util\n"
        "for m in ('prefopt.rl', 'prefopt.bon'):\n"
        "    if importlib.util.find_spec(m) is not None:\n"
        "        importlib.import_module(m)\n"
    )
    assert _imported_after(code) == set()


def test_lazy_attribute_errors_name_the_attribute():
    import prefopt

    with pytest.raises(AttributeError, match="no_such_name"):
        prefopt.no_such_name  # noqa: B018


def test_public_namespace_is_clean_and_resolves() -> None:
    import prefopt

    names = dir(prefopt)
    for leaked in ("Any", "annotations", "importlib", "_importlib", "_LAZY", "registry", "types"):
        assert leaked not in names
    assert names == sorted(prefopt.__all__)
    for name in prefopt.__all__:
        assert getattr(prefopt, name) is not None, name
    for main_path in (
        "get_loss",
        "PairLogps",
        "PairBatch",
        "BestOfNSamples",
        "LoraPolicy",
        "token_logps",
        "HFSampler",
        "Rollout",
        "seq_sum",
    ):
        assert main_path in names
