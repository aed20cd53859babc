"""Config loading, --set overrides and validation: every bad input gets one message naming the key,
the value and what is allowed."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from spindle.runtime.config import (
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    check_world_size,
    config_from_dict,
    load_config,
    resolve,
    save_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
PRESETS = [REPO / "configs" / "demo.yaml", REPO / "configs" / "tiny.yaml"]


def write_yaml(directory: Path, values: dict, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def config_error(directory: Path, values: dict, overrides: tuple[str, ...] = (),
                 world_size: int | None = None) -> str:
    """The message of the ConfigError that loading ``values`` raises."""
    with pytest.raises(ConfigError) as raised:
        load_config(write_yaml(directory, values), list(overrides), world_size=world_size)
    message = str(raised.value)
    assert "\n" not in message.strip(), f"expected one message line, got {message!r}"
    return message


def assert_mentions(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


# ---------------------------------------------------------------------------------------------
# presets, round trip, overrides
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_presets_load_and_validate(preset: Path) -> None:
    config = load_config(preset, [])
    assert isinstance(config, Config)
    assert set(config.model.layers) == {"L", "A"}, "presets exercise both layer kinds"


def test_tiny_preset_supports_context_parallel_degrees_up_to_four() -> None:
    config = load_config(PRESETS[1], [])
    for cp in (1, 2, 3, 4):
        for layout in ("zigzag", "contiguous"):
            if config.data.seq_len % (2 * cp if layout == "zigzag" else cp) == 0:
                validate(dataclasses.replace(config, parallel=dataclasses.replace(
                    config.parallel, cp=cp, cp_layout=layout)))
    assert config.data.seq_len % 8 == 0


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(PRESETS[0], ["train.steps=7", "model.kv_heads=2", "train.lr=1e-3"])
    resolved = resolve(config, world_size=1)
    save_config(resolved, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", []) == resolved
    assert config_from_dict(to_dict(resolved)) == resolved
    assert resolved.train.micro_batch == resolved.train.global_batch  # 0 resolved to global_batch / dp


def test_every_section_and_field_has_a_docstring() -> None:
    source = (REPO / "runtime" / "config.py").read_text(encoding="utf-8")
    for section_class in SECTIONS.values():
        for config_field in dataclasses.fields(section_class):
            declaration = f"    {config_field.name}: "
            start = source.index(declaration, source.index(f"class {section_class.__name__}"))
            following = source[start:].splitlines()[1].strip()
            assert following.startswith('"""'), f"{section_class.__name__}.{config_field.name} has no docstring"


def test_set_coerces_by_field_type(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"model": {"layers": "LLLA"}})
    config = load_config(path, ["train.steps=12", "train.lr=2.5e-4", "logging.progress=false",
                                "model.tie_embeddings=true", "model.layers=LA",
                                "launch.use_gpu=false", "logging.run_name=", "train.warmup_steps=0"])
    assert config.train.steps == 12 and isinstance(config.train.steps, int)
    assert config.train.lr == 2.5e-4 and isinstance(config.train.lr, float)
    assert config.logging.progress is False and config.model.tie_embeddings is True
    assert config.model.layers == "LA" and config.launch.use_gpu == "false"
    assert config.logging.run_name == ""


def test_set_overrides_yaml_and_later_set_wins(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"steps": 5, "seed": 3}})
    config = load_config(path, ["train.steps=9", "train.steps=11"])
    assert config.train.steps == 11 and config.train.seed == 3


def test_yaml_scalars_are_coerced(tmp_path: Path) -> None:
    # PyYAML reads 3e-3 as a string and `true` as a bool: both are accepted where they make sense.
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  lr: 3e-3\n  min_lr_ratio: 0\nlaunch:\n  use_gpu: false\n", encoding="utf-8")
    config = load_config(path, [])
    assert config.train.lr == 3e-3 and config.train.min_lr_ratio == 0.0 and config.launch.use_gpu == "false"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path, []) == Config()


# ---------------------------------------------------------------------------------------------
# bad inputs: (yaml values, overrides, fragments the message must contain)
# ---------------------------------------------------------------------------------------------
BAD_INPUTS = [
    # unknown sections and keys, with did-you-mean
    ({"modle": {"dim": 64}}, (), ["modle", "Did you mean 'model'", "'parallel'"]),
    ({"model": {"hidden": 64}}, (), ["model.hidden", "64", "'dim'", "'heads'"]),
    ({"train": {"stpes": 10}}, (), ["train.stpes", "Did you mean 'steps'"]),
    ({}, ("trian.steps=3",), ["trian", "Did you mean 'train'"]),
    ({}, ("train.global_bach=3",), ["train.global_bach", "Did you mean 'global_batch'"]),
    ({}, ("train.steps",), ["train.steps", "section.key=value"]),
    ({}, ("steps=3",), ["steps=3", "section.key=value"]),
    # wrong types
    ({"train": {"steps": "many"}}, (), ["train.steps", "'many'", "integer"]),
    ({"train": {"steps": 2.5}}, (), ["train.steps", "2.5", "integer"]),
    ({"train": {"global_batch": True}}, (), ["train.global_batch", "True", "integer"]),
    ({"train": {"lr": "fast"}}, (), ["train.lr", "'fast'", "number"]),
    ({"logging": {"progress": "sometimes"}}, (), ["logging.progress", "'sometimes'", "true or false"]),
    ({"model": {"layers": 7}}, (), ["model.layers", "7", "string"]),
    ({"model": [1, 2]}, (), ["model", "[1, 2]", "mapping"]),
    ({}, ("train.steps=ten",), ["train.steps", "'ten'", "integer"]),
    ({}, ("train.lr=abc",), ["train.lr", "'abc'", "number"]),
    ({}, ("logging.progress=maybe",), ["logging.progress", "'maybe'", "true or false"]),
    # out of range
    ({"train": {"steps": 0}}, (), ["train.steps", "0", ">= 1"]),
    ({"train": {"lr": -1.0}}, (), ["train.lr", "-1.0", "> 0"]),
    ({"train": {"beta2": 1.0}}, (), ["train.beta2", "1.0", "< 1"]),
    ({"train": {"min_lr_ratio": 1.5}}, (), ["train.min_lr_ratio", "1.5", "<= 1"]),
    ({"checkpoint": {"keep": 0}}, (), ["checkpoint.keep", "0", ">= 1"]),
    ({"model": {"vocab_size": 1}}, (), ["model.vocab_size", "1", ">= 2"]),
    ({"parallel": {"dp": 0}}, (), ["parallel.dp", "0", ">= 1"]),
    ({"parallel": {"zero_stage": 4}}, (), ["parallel.zero_stage", "4", "1, 2 or 3"]),
    ({"logging": {"log_every": 0}}, (), ["logging.log_every", "0", ">= 1"]),
    # cross-field rules
    ({"model": {"dim": 100, "heads": 3, "kv_heads": 1}}, (), ["model.dim = 100", "model.heads = 3", "multiple"]),
    ({"model": {"heads": 4, "kv_heads": 3}}, (), ["model.heads = 4", "model.kv_heads = 3", "divide"]),
    ({"model": {"dim": 96, "heads": 32, "kv_heads": 32}}, (), ["model.dim // model.heads = 3", "even"]),
    ({"model": {"heads": 4, "kv_heads": 4}, "parallel": {"tp": 3}}, (),
     ["model.heads = 4", "parallel.tp = 3", "divide"]),
    ({"model": {"heads": 4, "kv_heads": 2}, "parallel": {"tp": 4}}, (),
     ["model.kv_heads = 2", "parallel.tp = 4"]),
    ({"data": {"seq_len": 100}, "parallel": {"cp": 4}}, (),
     ["data.seq_len = 100", "8", "parallel.cp", "'zigzag'"]),
    ({"data": {"seq_len": 99}, "parallel": {"cp": 2, "cp_layout": "contiguous"}}, (),
     ["data.seq_len = 99", "2", "'contiguous'"]),
    ({"model": {"heads": 4, "kv_heads": 2}, "parallel": {"cp": 4, "cp_softmax": "ulysses"}}, (),
     ["model.kv_heads = 2", "parallel.cp = 4", "ulysses"]),
    ({"train": {"global_batch": 6}, "parallel": {"dp": 4}}, (), ["train.global_batch = 6", "parallel.dp = 4"]),
    ({"train": {"global_batch": 8, "micro_batch": 3}}, (), ["train.micro_batch = 3", "8"]),
    ({"parallel": {"dp": 2, "cp": 2}, "launch": {"min_workers": 3}}, (),
     ["launch.min_workers = 3", "multiple of parallel.cp * parallel.tp = 2", "e.g. 2"]),
    ({"parallel": {"dp": 2, "cp": 2}, "launch": {"min_workers": 6}}, (),
     ["launch.min_workers = 6", "job's 4 worker(s)", "up to 4"]),
    ({"launch": {"min_workers": -1}}, (), ["launch.min_workers", "-1", ">= 0"]),
    ({"launch": {"capacity_timeout_s": -5}}, (), ["launch.capacity_timeout_s", "-5", ">= 0"]),
    # pattern letters and scheme names
    ({"model": {"layers": "LLXA"}}, (), ["model.layers", "'LLXA'", "'L'", "'A'", "'X'"]),
    ({"model": {"layers": ""}}, (), ["model.layers", "''", "'L'", "'A'"]),
    ({"model": {"layers": "llla"}}, (), ["model.layers", "'llla'", "'L'", "'A'"]),
    ({"parallel": {"cp_linear": "lasp3"}}, (), ["parallel.cp_linear", "'lasp3'", "'lasp2'", "'lasp1'"]),
    ({"parallel": {"cp_softmax": "rng"}}, (), ["parallel.cp_softmax", "'rng'", "'allgather'", "'ring'",
                                               "'ulysses'", "Did you mean 'ring'"]),
    ({"parallel": {"cp_layout": "zig"}}, (), ["parallel.cp_layout", "'zig'", "'zigzag'", "'contiguous'"]),
    ({"parallel": {"dp_engine": "ddp"}}, (), ["parallel.dp_engine", "'ddp'", "'fsdp'", "'deepspeed'"]),
    ({"model": {"decay": "learned"}}, (), ["model.decay", "'learned'", "'none'", "'constant'", "'data'"]),
    ({"model": {"feature_map": "elu"}}, (), ["model.feature_map", "'elu'", "'elu1'", "'identity'"]),
    ({"parallel": {"activation_checkpointing": "some"}}, (),
     ["parallel.activation_checkpointing", "'some'", "'full'", "'none'"]),
    ({"train": {"precision": "fp16"}}, (), ["train.precision", "'fp16'", "'bf16'", "'fp32'", "'auto'"]),
    ({"logging": {"wandb": "cloud"}}, (), ["logging.wandb", "'cloud'", "'offline'", "'online'", "'disabled'"]),
    ({"launch": {"use_gpu": "yes"}}, (), ["launch.use_gpu", "'yes'", "'auto'", "'true'", "'false'"]),
    ({}, ("parallel.cp_softmax=ulyses",), ["parallel.cp_softmax", "'ulyses'", "Did you mean 'ulysses'"]),
    # data sources
    ({"data": {"source": "synthetic:recal"}}, (), ["data.source", "'synthetic:recal'", "'synthetic:recall'"]),
    ({"data": {"source": "/no/such/tokens.bin"}}, (), ["data.source", "/no/such/tokens.bin", "does not exist"]),
    ({"data": {"source": "synthetic:recall", "seq_len": 8}}, (), ["data.seq_len = 8", "16"]),
    ({"data": {"recall_pairs": 100}, "model": {"vocab_size": 64}}, (), ["data.recall_pairs = 100", "20"]),
]


@pytest.mark.parametrize("values, overrides, fragments", BAD_INPUTS,
                         ids=[f"{index}-{list(values) or list(overrides)}" for index, (values, overrides, _)
                              in enumerate(BAD_INPUTS)])
def test_bad_input_names_key_value_and_allowed(tmp_path: Path, values: dict, overrides: tuple[str, ...],
                                               fragments: list[str]) -> None:
    assert_mentions(config_error(tmp_path, values, overrides), *fragments)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_configs_built_in_code_are_type_checked() -> None:
    config = Config()
    config.train.global_batch = "8"
    with pytest.raises(ConfigError, match="train.global_batch = '8' has the wrong type: expected an integer"):
        validate(config)
    config = Config()
    config.train.lr = 1  # an int where a float is expected is fine
    validate(config)


def test_world_size_must_match_the_product_of_degrees(tmp_path: Path) -> None:
    values = {"parallel": {"dp": 2, "cp": 2, "tp": 1}, "train": {"global_batch": 8}}
    message = config_error(tmp_path, values, world_size=3)
    assert_mentions(message, "parallel.dp * parallel.cp * parallel.tp", "2 * 2 * 1", "3")
    load_config(write_yaml(tmp_path, values), [], world_size=4)  # matches: no error


def test_dp_minus_one_is_inferred_from_the_world_size(tmp_path: Path) -> None:
    values = {"parallel": {"dp": -1, "cp": 2}, "train": {"global_batch": 6}}
    config = load_config(write_yaml(tmp_path, values), [])  # unknown world size: dp rules wait
    assert resolve(config, world_size=6).parallel.dp == 3
    message = config_error(tmp_path, {"parallel": {"dp": -1, "cp": 2}, "train": {"global_batch": 5}},
                           world_size=4)
    assert_mentions(message, "train.global_batch = 5", "parallel.dp = 2")
    assert_mentions(config_error(tmp_path, values, world_size=5), "world size 5")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken, [])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing, [])


# ---------------------------------------------------------------------------------------------
# data files checked at validation time
# ---------------------------------------------------------------------------------------------
def test_token_file_rules(tmp_path: Path) -> None:
    base = {"model": {"vocab_size": 1000}, "data": {"seq_len": 64}}

    def with_source(path: Path, **data: object) -> dict:
        return {**base, "data": {**base["data"], "source": str(path), **data}}

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 129)
    assert_mentions(config_error(tmp_path, with_source(odd)), "data.source", "odd.bin", "129 bytes",
                    "multiple of 2", "'uint16'")
    assert_mentions(config_error(tmp_path, with_source(odd, dtype="uint32")), "multiple of 4", "'uint32'")

    short = tmp_path / "short.bin"
    np.arange(64, dtype=np.uint16).tofile(short)
    assert_mentions(config_error(tmp_path, with_source(short)), "short.bin", "64 tokens", "data.seq_len + 1 = 65")

    large_ids = tmp_path / "large.bin"
    np.full(1000, 5000, dtype=np.uint16).tofile(large_ids)
    assert_mentions(config_error(tmp_path, with_source(large_ids)), "large.bin", "5000", "model.vocab_size = 1000")

    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros(1000, dtype=np.float32))
    assert_mentions(config_error(tmp_path, with_source(floats)), "floats.npy", "float32", "integer")

    text = tmp_path / "tokens.txt"
    text.write_text("1 2 3", encoding="utf-8")
    assert_mentions(config_error(tmp_path, with_source(text)), "tokens.txt", "'.txt'", ".bin", ".npy")

    good = tmp_path / "good.npy"
    np.save(good, np.arange(1000, dtype=np.int32) % 1000)
    load_config(write_yaml(tmp_path, with_source(good)), [])


def test_validation_error_creates_nothing(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"parallel": {"cp_softmax": "rng"}})
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError):
        load_config(path, [])
    assert sorted(tmp_path.rglob("*")) == before


def test_apply_overrides_does_not_mutate_its_input() -> None:
    values = {"train": {"steps": 5}}
    apply_overrides(values, ["train.steps=6"])
    assert values == {"train": {"steps": 5}}


# ---------------------------------------------------------------------------------------------
# parsed once, handed on typed (the Ray path: tests/test_faults.py counts the `spindle train` process)
# ---------------------------------------------------------------------------------------------
def test_a_training_process_parses_and_validates_its_config_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m spindle.runtime.main` (what each torchrun process runs), in this process under a
    profile hook that counts real calls: one parse, one validation with the world size, and
    train_entry adds none."""
    from call_counter import config_functions, counting_calls

    from spindle.runtime.main import main

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    overrides = ["train.steps=2", "logging.wandb=disabled", "logging.progress=false", "checkpoint.every=0"]
    with counting_calls(**config_functions()) as counts:
        code = main([str(PRESETS[1]), "--run-dir", str(run_dir), *(f"--set={item}" for item in overrides)])
    assert code == 0, capsys.readouterr().err
    assert "finished step 2" in capsys.readouterr().out
    assert dict(counts) == {"parse": 1, "validate": 1, "check_world_size": 0}


def test_train_entry_and_the_ray_worker_take_only_a_typed_config(tmp_path: Path) -> None:
    from spindle.launch.worker import train_worker
    from spindle.runtime.main import train_entry

    config = load_config(PRESETS[1], [])
    with pytest.raises(TypeError, match="takes a validated Config.*got a dict"):
        train_entry(to_dict(config), str(tmp_path / "run"))
    job = {"config": to_dict(config), "run_dir": str(tmp_path / "run"), "resume": "never", "latest_at_launch": None}
    with pytest.raises(TypeError, match="config is a dict, expected the driver's validated Config"):
        train_worker(job)
    assert not (tmp_path / "run").exists()
    travelled = pickle.loads(pickle.dumps(config))  # how Ray hands it to the workers
    assert type(travelled) is Config and travelled == config


@pytest.mark.parametrize("values, wrong, right", [
    ({"parallel": {"dp": 2}}, 3, 2),
    ({"parallel": {"dp": -1}, "train": {"global_batch": 6}}, 4, 2),
    ({"parallel": {"dp": -1}, "launch": {"min_workers": 4}}, 2, 4),
], ids=["product", "inferred-dp-batch", "min-workers"])
def test_world_size_rules_alone_say_what_full_validation_says(tmp_path: Path, values: dict, wrong: int,
                                                              right: int) -> None:
    """check_world_size (the Ray driver's check once it knows its workers) raises the message that
    validate(config, world_size) gives, on a config that passed validation without a world size."""
    config = load_config(write_yaml(tmp_path, values), [])
    with pytest.raises(ConfigError) as alone:
        check_world_size(config, wrong)
    assert str(alone.value) == config_error(tmp_path, values, world_size=wrong)
    check_world_size(config, right)
