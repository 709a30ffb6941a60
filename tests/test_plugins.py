"""The plugin manager: entry points of group ``align`` are found and registered; two packages
registering one name is an error naming both; a plugin that fails to import, or whose register
hook raises (a misspelt option), is reported by name and skipped while the others load;
``ALIGN_PLUGINS`` restricts loading and ``ALIGN_PLUGIN_MODULES`` adds modules by import path;
lifecycle plugins are listed; config fields typed as a plugin kind are widened to the installed
plugins at any depth.

Installed packages are faked with ``*.dist-info`` folders (METADATA + entry_points.txt) in a tmp
folder on ``sys.path``: ``importlib.metadata`` finds them exactly as it finds pip-installed ones.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import dpo_config, run_cli, sft_config

import align.cli
from align import ConfigError, Registry, load_plugins
from align.loading import validate_run_config
from align.plugins import PluginLoadWarning
from align.registry import DuplicateRegistration
from align.widening import run_config_class

LOSS_MODULE = """
from typing import Literal

import align


class {cls}(align.LossConfig):
    name: Literal["{loss}"] = "{loss}"
    gamma: float = 1.0


@align.hookimpl
def register_losses(register):
    @register({cls}, needs_reference=False)
    def {loss}(cfg: {cls}, b: align.PreferenceBatch) -> align.LossOutput:
        return align.LossOutput(-(b.chosen_logps_mean - b.rejected_logps_mean).mean() * cfg.gamma)
"""

MakeDist = Callable[..., None]


def loss_module(loss: str) -> str:
    return LOSS_MODULE.format(cls=f"{loss.title().replace('_', '')}Config", loss=loss)


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDist]:
    """``fake_dist(package, entry_point, module, source)``: an 'installed' distribution whose
    entry point ``entry_point = module`` (group ``align``) loads ``source``."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def make(package: str, entry_point: str, module: str, source: str, version: str = "1.2.3") -> None:
        info = site / f"{package.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[align]\n{entry_point} = {module}\n")
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        modules.append(module)

    yield make
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def fresh_cli_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI loads plugins afresh (``default_plugins`` is cached per process)."""
    monkeypatch.setattr(align.cli, "default_plugins", load_plugins)


def test_builtin_plugins_are_found_through_entry_points():
    registry = load_plugins().registry
    assert {"dpo", "sft"} <= set(registry.names("algorithm"))
    assert "dpo" in registry.names("loss")
    assert "hf" in registry.names("backend")
    assert {"preference", "sft"} <= set(registry.names("data_format"))
    assert registry.get("algorithm", "dpo").package == "align-dpo"
    assert registry.get("backend", "hf").package == "align-hf"
    assert registry.get("data_format", "sft").package == "align"
    assert registry.broken == []


def test_a_third_party_loss_is_registered_and_validated(fake_dist, tmp_path):
    fake_dist("fake-margin", "fake_margin", "fake_margin_mod", loss_module("fake_margin"))
    registry = load_plugins().registry
    entry = registry.get("loss", "fake_margin")
    assert (entry.package, entry.version) == ("fake-margin", "1.2.3")
    assert entry.meta["needs_reference"] is False
    assert entry.meta["batch"] is align.PreferenceBatch

    data = {**dpo_config(tmp_path / "out"), "loss": {"name": "fake_margin", "gamma": 2.0}}
    cfg = validate_run_config(data, registry)
    assert cfg.loss.gamma == 2.0  # type: ignore[attr-defined]
    assert type(cfg.loss).__name__ == "FakeMarginConfig"  # type: ignore[attr-defined]
    # The plugin's own config class is strict, and the error is still a dotted path.
    bad = {**data, "loss": {"name": "fake_margin", "gama": 2.0}}
    with pytest.raises(ConfigError, match=r"loss\.gama: unknown key \(did you mean 'gamma'\?\)"):
        validate_run_config(bad, registry)


def test_two_packages_registering_one_name_is_an_error_naming_both(fake_dist):
    fake_dist("fake-twin-one", "twin_one", "twin_one_mod", loss_module("twin"))
    fake_dist("fake-twin-two", "twin_two", "twin_two_mod", loss_module("twin"))
    with pytest.raises(DuplicateRegistration) as info:
        load_plugins()
    message = str(info.value)
    assert "loss 'twin'" in message
    assert "'fake-twin-one'" in message and "'fake-twin-two'" in message
    assert "ALIGN_PLUGINS" in message


def test_duplicate_of_a_builtin_name_names_the_builtin_package(fake_dist):
    fake_dist("fake-dpo-clone", "dpo_clone", "dpo_clone_mod", loss_module("dpo"))
    with pytest.raises(DuplicateRegistration) as info:
        load_plugins()
    assert "loss 'dpo'" in str(info.value)
    assert "'align-dpo'" in str(info.value) and "'fake-dpo-clone'" in str(info.value)


def test_duplicate_exits_2_from_the_cli(fake_dist, fresh_cli_plugins, capsys):
    fake_dist("fake-dup-a", "dup_a", "dup_a_mod", loss_module("dup"))
    fake_dist("fake-dup-b", "dup_b", "dup_b_mod", loss_module("dup"))
    result = run_cli(capsys, "list", "--json")
    assert result.code == 2
    assert "fake-dup-a" in result.err and "fake-dup-b" in result.err
    assert "Traceback" not in result.err


def test_align_plugins_resolves_a_duplicate(fake_dist, monkeypatch):
    fake_dist("fake-dup-c", "dup_c", "dup_c_mod", loss_module("dup2"))
    fake_dist("fake-dup-d", "dup_d", "dup_d_mod", loss_module("dup2"))
    monkeypatch.setenv("ALIGN_PLUGINS", "dpo,hf,dup_d")
    registry = load_plugins().registry
    assert registry.get("loss", "dup2").package == "fake-dup-d"


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("import align_no_such_dependency\n", "No module named 'align_no_such_dependency'"),
        ("def broken(:\n", "SyntaxError"),
    ],
    ids=["raises", "missing-dependency", "syntax-error"],
)
def test_a_plugin_failing_to_import_is_reported_and_others_still_load(
    fake_dist, fresh_cli_plugins, capsys, source, error
):
    fake_dist("fake-broken", "broken_plugin", "broken_plugin_mod", source)
    fake_dist("fake-healthy", "healthy", "healthy_mod", loss_module("healthy"))
    with pytest.warns(PluginLoadWarning, match=r"'broken_plugin' from package 'fake-broken'") as caught:
        registry = load_plugins().registry
    assert error in str(caught[0].message)
    # Everything else loaded: the built-ins and the other third-party plugin.
    assert {"dpo", "sft"} <= set(registry.names("algorithm"))
    assert registry.get("loss", "healthy").package == "fake-healthy"
    assert [(b.name, b.package, b.version) for b in registry.broken] == [
        ("broken_plugin", "fake-broken", "1.2.3")
    ]
    assert error in registry.broken[0].error

    with pytest.warns(PluginLoadWarning):
        result = run_cli(capsys, "list", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    broken = [row for row in rows if row.get("status") == "broken"]
    assert len(broken) == 1
    assert broken[0]["name"] == "broken_plugin" and broken[0]["package"] == "fake-broken"
    assert error in broken[0]["error"]
    assert any(row["name"] == "healthy" and row["status"] == "ok" for row in rows)
    assert any(row["kind"] == "algorithm" and row["name"] == "dpo" for row in rows)


def test_align_plugins_restricts_loading(fake_dist, monkeypatch, recwarn):
    fake_dist("fake-broken-2", "broken_two", "broken_two_mod", "raise RuntimeError('never imported')\n")
    fake_dist("fake-extra", "extra", "extra_mod", loss_module("extra"))
    monkeypatch.setenv("ALIGN_PLUGINS", "dpo, extra")
    registry = load_plugins().registry
    assert registry.names("algorithm") == ["dpo"]
    assert registry.names("backend") == []
    assert "extra" in registry.names("loss")
    assert registry.broken == []
    assert not [w for w in recwarn if issubclass(w.category, PluginLoadWarning)]
    assert "broken_two_mod" not in sys.modules, "an entry point left out is never imported"
    # The core's own data formats do not come from entry points and are always there.
    assert {"preference", "sft"} <= set(registry.names("data_format"))

    monkeypatch.setenv("ALIGN_PLUGINS", "sft,hf")
    registry = load_plugins().registry
    assert registry.names("algorithm") == ["sft"]
    assert registry.names("backend") == ["hf"]
    assert "extra" not in registry.names("loss")


def test_align_plugin_modules_registers_a_module_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "local_loss_plugin.py").write_text(loss_module("local_loss"))
    (tmp_path / "local_hooks_plugin.py").write_text(
        textwrap.dedent(
            """
            import align

            CALLS = []

            @align.hookimpl
            def on_step_end(run, step, metrics):
                CALLS.append((step, metrics["loss"]))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "local_loss_plugin, local_hooks_plugin")
    try:
        plugins = load_plugins()
        entry = plugins.registry.get("loss", "local_loss")
        assert (entry.package, entry.version) == ("local_loss_plugin", "local")
        plugins.manager.hook.on_step_end(run=None, step=3, metrics={"loss": 0.5})
        assert sys.modules["local_hooks_plugin"].CALLS == [(3, 0.5)]
    finally:
        sys.modules.pop("local_loss_plugin", None)
        sys.modules.pop("local_hooks_plugin", None)


# ---- registration options and broken registrations ------------------------------------------


def test_a_misspelt_registration_option_reports_the_plugin_as_broken(fake_dist, fresh_cli_plugins, capsys):
    source = loss_module("typo_loss").replace("needs_reference=False", "needs_refrence=False")
    fake_dist("fake-typo", "typo", "typo_mod", source)
    fake_dist("fake-fine", "fine", "fine_mod", loss_module("fine_loss"))
    with pytest.warns(PluginLoadWarning, match=r"'typo' from package 'fake-typo'") as caught:
        registry = load_plugins().registry
    message = str(caught[0].message)
    assert "loss 'typo_loss' of package 'fake-typo'" in message
    assert "unknown registration option 'needs_refrence' (did you mean 'needs_reference'?)" in message
    assert "typo_loss" not in registry.names("loss")
    assert registry.get("loss", "fine_loss").package == "fake-fine"
    with pytest.warns(PluginLoadWarning):
        rows = json.loads(run_cli(capsys, "list", "--json").out)
    assert [(r["name"], r["status"]) for r in rows if r["package"] == "fake-typo"] == [("typo", "broken")]


@pytest.mark.parametrize(
    ("registration", "error"),
    [
        ("register(align.LossConfig)(lambda cfg, run: None)", "config must subclass align.CallbackConfig"),
        ("register(Watch, batch=int)(lambda cfg, run: None)", "Options of a callback: none"),
        ("register(Watch)(lambda cfg, run: None); raise RuntimeError('boom')", "RuntimeError: boom"),
    ],
    ids=["wrong-config-kind", "option-of-another-kind", "hook-raises"],
)
def test_a_plugin_whose_register_hook_raises_is_broken_and_leaves_nothing_behind(
    fake_dist, registration, error
):
    """The loss it registered before the failing hook is dropped too, and its lifecycle hooks
    never run: a half-registered plugin would behave unpredictably."""
    source = loss_module("half_loss") + textwrap.dedent(
        f"""
        CALLS = []

        class Watch(align.CallbackConfig):
            name: Literal["watch"] = "watch"

        @align.hookimpl
        def register_callbacks(register):
            {registration}

        @align.hookimpl
        def on_step_end(run, step, metrics):
            CALLS.append(step)
        """
    )
    fake_dist("fake-half", "half", "half_mod", source)
    with pytest.warns(PluginLoadWarning, match=r"'half' from package 'fake-half'") as caught:
        plugins = load_plugins()
    assert error in str(caught[0].message)
    registry = plugins.registry
    assert [(b.name, b.package) for b in registry.broken] == [("half", "fake-half")]
    assert error in registry.broken[0].error
    assert "half_loss" not in registry.names("loss") and "watch" not in registry.names("callback")
    assert "half" not in registry.names("lifecycle")
    plugins.manager.hook.on_step_end(run=None, step=1, metrics={})
    assert sys.modules["half_mod"].CALLS == []
    assert {"dpo", "sft"} <= set(registry.names("algorithm"))
    with pytest.raises(ConfigError, match=r"unknown loss 'half_loss'.*Broken plugins, not loaded: 'half'"):
        registry.get("loss", "half_loss")


def test_lifecycle_plugins_are_listed_with_their_hooks(tmp_path, monkeypatch, capsys):
    (tmp_path / "listed_hooks_plugin.py").write_text(
        "import align\n\n@align.hookimpl\ndef on_checkpoint(run, step, path):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "listed_hooks_plugin")
    monkeypatch.setattr(align.cli, "default_plugins", load_plugins)
    try:
        result = run_cli(capsys, "list", "--kind", "lifecycle", "--json")
    finally:
        sys.modules.pop("listed_hooks_plugin", None)
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert rows["listed_hooks_plugin"]["hooks"] == ["on_checkpoint"]
    assert rows["listed_hooks_plugin"]["package"] == "listed_hooks_plugin"
    assert rows["metrics_jsonl"]["package"] == "align"
    assert rows["metrics_jsonl"]["hooks"] == ["on_train_start", "on_step_end"]
    callbacks = json.loads(run_cli(capsys, "list", "--kind", "callback", "--json").out)
    assert [(row["name"], row["package"]) for row in callbacks] == [("early_stopping", "align")]


# ---- config fields widened from their types --------------------------------------------------

WIDE_ALGORITHM = """
from typing import Literal

from pydantic import Field

import align


class EngineBase(align.RolloutEngineConfig):
    '''Abstract (name is a plain str): widened to the engines that subclass it.'''


class EchoEngine(EngineBase):
    name: Literal["echo"] = "echo"
    speed: int = 1


class UnusedBase(align.RewardConfig):
    '''No installed reward subclasses it.'''


class ConstReward(align.RewardConfig):
    name: Literal["const"] = "const"
    value: float = 1.0


class HalfReward(align.RewardConfig):
    name: Literal["half"] = "half"
    inner: align.RewardConfig | None = None


class Section(align.StrictConfig):
    rewards: dict[str, align.RewardConfig] = {}
    terms: align.LossConfig | list[align.LossConfig] | None = None
    label: str = "plain"


class WideConfig(align.RunConfig):
    algo: Literal["wide"] = "wide"
    rollout: EngineBase = Field(
        default_factory=lambda: EngineBase(name="echo"), description="the generation engine"
    )
    reward: align.RewardConfig
    section: Section = Section()
    fixed: ConstReward = ConstReward()
    unused: UnusedBase | None = None


class Wide(align.Algorithm):
    pass


@align.hookimpl
def register_algorithms(register):
    register(WideConfig, batch=align.SFTTokens, data_format="sft")(Wide)


@align.hookimpl
def register_rollout_engines(register):
    register(EchoEngine)(lambda cfg, spec: None)


@align.hookimpl
def register_rewards(register):
    register(ConstReward)(lambda cfg: None)
    register(HalfReward)(lambda cfg: None)
"""


@pytest.fixture
def wide_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    (tmp_path / "wide_algorithm_plugin.py").write_text(WIDE_ALGORITHM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ALIGN_PLUGIN_MODULES", "wide_algorithm_plugin")
    try:
        yield load_plugins().registry
    finally:
        sys.modules.pop("wide_algorithm_plugin", None)


def wide_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    return {
        **sft_config(tmp_path / "out"),
        "algo": "wide",
        "reward": {"name": "const", "value": 2.0},
        **sections,
    }


def test_fields_typed_as_a_plugin_kind_are_widened_at_any_depth(wide_registry, tmp_path):
    section = {
        "rewards": {"a": {"name": "const", "value": 3.0}, "b": {"name": "half", "inner": {"name": "const"}}},
        "terms": [{"name": "dpo", "beta": 0.2}, {"name": "kto"}],
    }
    cfg: Any = validate_run_config(wide_config(tmp_path, section=section), wide_registry)
    assert type(cfg.reward).__name__ == "ConstReward" and cfg.reward.value == 2.0
    # A default given as a base-class instance becomes the plugin's own config.
    assert type(cfg.rollout).__name__ == "EchoEngine" and cfg.rollout.speed == 1
    assert type(cfg.section.rewards["a"]).__name__ == "ConstReward" and cfg.section.rewards["a"].value == 3.0
    assert type(cfg.section.rewards["b"].inner).__name__ == "ConstReward"  # inside a plugin's config
    # No loss_batch registered: every installed loss fits.
    assert [type(t).__name__ for t in cfg.section.terms] == ["DPOLoss", "KTOLoss"]
    assert cfg.section.terms[0].beta == 0.2
    assert [type(c).__name__ for c in cfg.callbacks] == []

    cls = run_config_class(wide_registry.get("algorithm", "wide"), wide_registry)
    fixed = cls.model_fields["fixed"].annotation
    assert fixed is sys.modules["wide_algorithm_plugin"].ConstReward, "a concrete config is left alone"
    assert cls.model_fields["rollout"].description == "the generation engine"
    schema = cls.model_json_schema()
    assert {"const", "half", "model"} <= set(schema["properties"]["reward"]["discriminator"]["mapping"])


def test_errors_in_widened_fields_name_the_path_and_the_choices(wide_registry, tmp_path):
    def error(**sections: Any) -> str:
        with pytest.raises(ConfigError) as info:
            validate_run_config(wide_config(tmp_path, **sections), wide_registry)
        return str(info.value)

    message = error(reward={"name": "nope"})
    assert "reward: unknown reward 'nope'" in message and "'const'" in message
    message = error(section={"rewards": {"a": {"name": "const", "valu": 1}}})
    assert "section.rewards.a.valu: unknown key" in message
    message = error(reward={"name": "half", "inner": {"name": "const", "valu": 1}})
    assert "reward.inner.valu: unknown key (did you mean 'value'?)" in message
    # One loss entry reported once, in the shape the user wrote (a list), not twice.
    message = error(section={"terms": [{"name": "dpo", "betta": 0.1}]})
    assert message.count("\n") == 1 and "section.terms.0.betta: unknown key" in message
    without_reward = {key: value for key, value in wide_config(tmp_path).items() if key != "reward"}
    with pytest.raises(ConfigError, match=r"reward: required key is missing"):
        validate_run_config(without_reward, wide_registry)
    message = error(unused={"name": "x"})
    assert "unused" in message and "no installed reward plugin fits here (UnusedBase)" in message


COMMAND_MODULE = """
import align


@align.hookimpl
def register_commands(add_command):
    def arguments(parser):
        parser.add_argument("word")

    def run(args, plugins):
        if args.word == "bad":
            raise align.UserError("bad word")
        print(f"hello {args.word} from {len(plugins.registry.names('algorithm'))} algorithms")

    add_command("greet", "says hello", arguments, run)
"""


def test_a_plugin_adds_a_cli_command(fake_dist, fresh_cli_plugins, capsys):
    fake_dist("fake-greeter", "greeter", "greeter_mod", COMMAND_MODULE)
    result = run_cli(capsys, "greet", "world")
    assert result.code == 0, result.err
    assert result.out.startswith("hello world from ")
    failed = run_cli(capsys, "greet", "bad")
    assert failed.code == 2 and "bad word" in failed.err and "Traceback" not in failed.err
    assert "fake-greeter" in run_cli(capsys, "--help").out


def test_a_plugin_command_reusing_a_name_is_an_error_naming_both(fake_dist, fresh_cli_plugins, capsys):
    fake_dist("fake-greeter-a", "greeter_a", "greeter_a_mod", COMMAND_MODULE)
    fake_dist("fake-runner", "runner", "runner_mod", COMMAND_MODULE.replace('"greet"', '"run"'))
    result = run_cli(capsys, "list")
    assert result.code == 2
    assert "'align run'" in result.err and "'align'" in result.err and "fake-runner" in result.err
