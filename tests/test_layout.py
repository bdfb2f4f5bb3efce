"""The package's layout: every relative import, also the lazy ones inside functions, names a module that exists."""

import ast
from pathlib import Path

import pytest

import hf_fastbert


PACKAGE = Path(hf_fastbert.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def _exists(path: Path) -> bool:
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


@pytest.mark.parametrize("module", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_relative_imports_name_existing_modules(module):
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.parent
            for _ in range(node.level - 1):
                base = base.parent
            assert base.is_relative_to(PACKAGE.parent), (module, node.lineno)
            if node.module:
                assert _exists(base / node.module.replace(".", "/")), f"{module}:{node.lineno} from {node.module}"
            else:  # `from . import name`: a module of that package, or a name its __init__ defines
                init = (base / "__init__.py").read_text(encoding="utf-8")
                for alias in node.names:
                    assert _exists(base / alias.name) or alias.name in init, f"{module}:{node.lineno} {alias.name}"
