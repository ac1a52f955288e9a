import pytest

from kdistill.config import dump_config, list_recipes, load_config, recipe_description, recipe_dir, validate_config
from kdistill.errors import ConfigError
from kdistill.pipeline.students import is_shaped


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_validates_and_opens_with_its_command(name):
    cfg = load_config(name)
    first_line = (recipe_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# kdistill run"), first_line
    assert cfg.name


def opening_comment(name: str) -> str:
    """The comment lines a shipped recipe opens with, after its command, joined over the line breaks."""
    lines = []
    for line in (recipe_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return " ".join(" ".join(lines).split())


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_recipes_prints_the_first_sentence_of_each_description_whole(name, capsys):
    from kdistill.cli import recipes

    recipes()
    printed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(printed) == {f.name.removesuffix(".yaml") for f in recipe_dir().iterdir() if f.name.endswith(".yaml")}
    description, comment = printed[name], opening_comment(name)
    assert description[-1] in ".!?", description
    assert comment.startswith(description) and comment[len(description):len(description) + 1] in ("", " ")
    assert description.count("(") == description.count(")"), description  # not cut inside brackets


def test_a_recipe_description_runs_to_its_first_sentence_end():
    text = ("# kdistill run x\n# Soft targets (Hinton et al. 2015), e.g. a transfer set, and\n"
            "#   hidden states. Then more.\nname: x  # not the description.\n")
    assert recipe_description(text) == "Soft targets (Hinton et al. 2015), e.g. a transfer set, and hidden states."
    assert recipe_description("# kdistill run x\n# No sentence end\n# here\nname: x\n") == "No sentence end here"
    assert recipe_description("# kdistill run x\n# Is it? Yes.\n") == "Is it?"
    assert recipe_description("# One line only. Two.\nname: x\n") == "One line only."
    assert list_recipes()["tiny"] == (
        "A tiny student on BBC News: 2 layers, width 384 -> 128 (4 of 12 heads, 512 of 1536 FFN neurons, kept by "
        "activation importance on a calibration batch), >= 5x fewer parameters than MiniLM-L6; soft targets + "
        "hidden MSE.")


def test_default_recipe_is_the_builtin_english_pipeline():
    cfg = load_config(None)
    assert (cfg.data.dataset, cfg.teacher.model, cfg.task) == ("bbc-news", "minilm-l6", "classification")
    assert cfg.data.max_length >= 128


def test_overrides_are_typed_and_nested():
    cfg = load_config("default", ["train.epochs=2", "student.layers=[0, 5]", "distill.losses={kd: 1}",
                                  "data.limit=10"])
    assert cfg.train.epochs == 2 and cfg.student.layers == [0, 5]
    assert cfg.distill.losses == {"kd": 1} and cfg.data.limit == 10


@pytest.mark.parametrize("override, message", [
    ("train.epochz=3", "unknown key 'train.epochz' (did you mean 'train.epochs'?)"),
    ("trian.epochs=3", "unknown key 'trian'"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("distill.strategy=magic", "distill.strategy:"),
    ("distill.losses={kdd: 1}", "distill.losses: unknown loss term 'kdd' (did you mean 'kd'?)"),
    ("distill.losses={kd: 0}", "at least one loss term needs a positive weight"),
    ("train.grad_accum=3", "batch_size must be divisible by grad_accum"),
    ("train.epochs", "expected key=value"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    text = str(err.value)
    assert message in text and "\n" not in text


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: bbc-news\n  max_lenght: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'data.max_lenght' \(did you mean 'data.max_length'"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+: invalid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")


def test_data_source_required():
    with pytest.raises(ConfigError, match="set data.dataset or data.train_file"):
        validate_config({"data": {"dataset": None}})


@pytest.mark.parametrize("content, message", [
    (b"name: caf\xe9\n", r"latin1.yaml: line 1: not valid UTF-8 text \(byte 9\); re-save the file as UTF-8"),
    (b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"latin1.yaml: invalid YAML: nested too deeply"),
    (b"train:\n  epochs: 1\ntrain:\n  lr: 0.1\n", r"latin1.yaml line 3: invalid YAML: key 'train' appears twice"),
    (b"x: &b {epochs: 1}\ntrain:\n  <<: *b\n  epochs: 2\n", r"latin1.yaml: unknown key 'x'"),  # merges still work
])
def test_unreadable_recipe_files_are_config_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("student.intermediate_size=abc", "student.intermediate_size:"),
    ("student.hidden_size=abc", "student.hidden_size:"),
    ("distill.layer_mapping=sideways", "distill.layer_mapping:"),
])
def test_errors_in_union_typed_keys_name_the_whole_key(override, key):
    with pytest.raises(ConfigError, match=f"--set: {key}"):
        load_config("default", [override])


@pytest.mark.parametrize("raw, message", [
    ({"int": 1}, "config: unknown key 'int'"),
    ({"data": {"list": 1}}, "config: unknown key 'data.list'"),
    ({"data": {"a\nb": 1}}, "config: unknown key 'data.'a\\nb''"),
])
def test_unknown_keys_named_like_types_or_holding_line_breaks_are_named_on_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("recipe, overrides, message", [
    ("default", ["train.fsdp=true"], "train.fsdp: shards causal-lm students of strategy explicit, not "
                                     "classification / explicit"),
    ("lm-depth", ["train.fsdp=true", "distill.on_policy_fraction=0.5"], "train.fsdp: not with "
                                                                        "distill.on_policy_fraction"),
    ("lm-depth", ["train.fsdp=true", "train.checkpoint_every=10"], "train.checkpoint_every: sharded (train.fsdp)"),
])
def test_fsdp_outside_what_it_shards_is_a_config_error(recipe, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert load_config("lm-depth", ["train.fsdp=true"]).train.fsdp


@pytest.mark.parametrize("overrides, message", [
    (["distill.losses={aligned_kd: 1, forward_kl: 1}"], "compare(s) the two models position by position"),
    (["distill.losses={uld: 1, lm: 1}", "student.model=null"], "distill.losses.uld: set student.model"),
    (["distill.on_policy_fraction=0.2"], "a generated text is not in the teacher signal"),
    (["distill.cache_teacher=off"], "distill.cache_teacher: off: aligned_kd reads the teacher signal"),
])
def test_cross_tokenizer_terms_are_refused_where_they_cannot_run(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("lm-cross", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", list_recipes())
def test_the_config_a_run_writes_loads_back_to_the_same_run(name, tmp_path):
    """`--resume` and a copied config.yaml read the dumped config: it must mean what the recipe meant, including a
    student.model taken whole (no shape key) against one cut by a shape key."""
    cfg = load_config(name)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(saved)
    assert again.model_dump() == cfg.model_dump()
    assert is_shaped(again.student) == is_shaped(cfg.student)


@pytest.mark.parametrize(("overrides", "shaped", "layers"), [
    (["student.model=null"], True, 2),                    # derived from the teacher: 2 layers by default
    ([], False, None),                                    # a pretrained student (minilm-l6), taken whole
    (["student.layers=3"], True, 3),                      # ... cut to 3 of its layers
    (["student.hidden_size=128"], True, 2),               # a width alone cuts it to the default depth
])
def test_a_student_model_is_cut_only_where_a_shape_key_is_given(overrides, shaped, layers, tmp_path):
    cfg = load_config("newsgroups", overrides)
    assert (is_shaped(cfg.student), cfg.student.layers) == (shaped, layers)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg), encoding="utf-8")
    assert (is_shaped(load_config(saved).student), load_config(saved).student.layers) == (shaped, layers)
