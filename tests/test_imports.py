"""The package's import graph: no circle, and each module imports only modules below it in the pipeline.

The order, lowest first, is the pipeline's: a recipe is read, a run folder made, data prepared, the model loaded, its
memory estimated, the speed plan decided (its own modules lowest first: the kernel, the autograd functions, the
checkpoint functions, the upstream bends, the plan), the trainer built, then what comes after training (evaluation,
merge and export, report, upload, chat), the pipeline that runs it all, and the command line. A new module goes
where it belongs in this list; an import against it means the code sits in the wrong module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_kit"

ORDER = [
    "qlora_kit.recipe",
    "qlora_kit",  # the package's __init__ re-exports the recipe's errors
    "qlora_kit.rundir",
    "qlora_kit.rewards",  # the GRPO rewards: the data reads the columns they need
    "qlora_kit.data",
    "qlora_kit.model",
    "qlora_kit.memory",
    "qlora_kit.speed.nf4_triton",
    "qlora_kit.speed.fp8",  # float8 matmuls over the NF4 kernel: read by the fused LoRA layers
    "qlora_kit.speed.lora_autograd",
    "qlora_kit.speed.checkpointing",
    "qlora_kit.speed.attention",
    "qlora_kit.speed.patches",
    "qlora_kit.speed.shared_prefix",  # the pair forward: a bend (patches.rebind_forward) the plan applies
    "qlora_kit.speed.generation",  # GRPO's sampling weights: entered by the GRPO trainer, decided by the plan
    "qlora_kit.speed.cuda_graphs",  # decoder layers replayed as CUDA graphs: a bend (rebind_forward) the plan applies
    "qlora_kit.speed.plan",
    "qlora_kit.speed",
    "qlora_kit.trainers",
    "qlora_kit.evaluate",  # the card: train -> save -> evaluate -> export; the merge check reads its held-out rows
    "qlora_kit.export",
    "qlora_kit.gguf",
    "qlora_kit.report",
    "qlora_kit.publish",
    "qlora_kit.chat",
    "qlora_kit.pipeline",
    "qlora_kit.cli",
    "qlora_kit.__main__",
]


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def internal_imports(name: str, source: str, modules: dict[str, Path]) -> set[str]:
    """The package modules that module `name` (its `source`) imports anywhere (module level and inside functions),
    including the package __init__ files that importing a submodule runs first (except the importer's own)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    targets = set()
    for target in found:
        parts = target.split(".")
        for end in range(1, len(parts) + 1):  # qlora_kit.speed.plan runs qlora_kit and qlora_kit.speed first
            prefix = ".".join(parts[:end])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                targets.add(prefix)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: internal_imports(name, path.read_text(), modules) for name, path in modules.items()}


def test_every_module_imports_and_the_import_graph_has_no_circle():
    graph = import_graph()
    for name in graph:
        if name != "qlora_kit.__main__":  # runs the command line
            importlib.import_module(name)
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", f"import circle: {' -> '.join([*path, name, target])}"
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_each_module_imports_only_modules_below_it_in_the_pipeline_order():
    graph = import_graph()
    unplaced = sorted(set(graph) - set(ORDER))
    assert not unplaced, f"place {unplaced} in tests/test_imports.py's ORDER, where it belongs in the pipeline"
    upward = [f"{name} imports {target}" for name, targets in graph.items() for target in sorted(targets)
              if ORDER.index(target) > ORDER.index(name)]
    assert upward == [], "imports against the pipeline order:\n" + "\n".join(upward)


def test_the_import_graph_sees_imports_inside_functions_and_the_packages_they_run():
    """The checks above can fail: an import inside a function counts, and so does the package __init__ it runs."""
    modules = package_modules()
    source = "def f():\n    from qlora_kit.speed.plan import SpeedPlan\n    import qlora_kit.pipeline\n"
    assert internal_imports("qlora_kit.model", source, modules) == {"qlora_kit.speed.plan", "qlora_kit.speed",
                                                                      "qlora_kit.pipeline"}
    assert internal_imports("qlora_kit.speed.patches", source, modules) == {"qlora_kit.speed.plan",
                                                                              "qlora_kit.pipeline"}
