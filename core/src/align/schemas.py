"""JSON Schemas of algorithms' full run configs, for editors that validate YAML.

python -m align.schemas schemas/     # rewrite one file per installed built-in algorithm
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from align.plugins import Plugins, load_plugins
from align.widening import run_config_class

# The distributions that live in this repository; their schemas are checked in under schemas/.
BUILTIN_PACKAGES = frozenset(
    {
        "align-hf",
        "align-vllm",
        "align-trtllm",
        "align-rewards",
        "align-sft",
        "align-dpo",
        "align-kto",
        "align-reward",
        "align-rs",
        "align-grpo",
        "align-ppo",
        "align-spin",
        "align-spr",
        "align-steerlm",
        "align-pytriton",
        "align-megatron",
        "align-ilql",
    }
)


def schema_for(name: str, plugins: Plugins) -> dict[str, Any]:
    cls = run_config_class(plugins.registry.get("algorithm", name), plugins.registry)
    return cls.model_json_schema()


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def builtin_schemas() -> dict[str, str]:
    """File name -> text, for every algorithm shipped in this repository, as configured by
    the built-in plugins alone (a third-party loss installed here must not change them)."""
    plugins = load_plugins(BUILTIN_PACKAGES)
    return {
        f"{entry.name}.json": render(schema_for(entry.name, plugins))
        for entry in plugins.registry.entries("algorithm")
    }


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "schemas")
    target.mkdir(parents=True, exist_ok=True)
    for name, text in builtin_schemas().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
