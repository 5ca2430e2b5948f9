import pytest

from groundmill.pipeline.cli import main
from groundmill.pipeline.config import ConfigError, load_config, segments
from groundmill.stages.tagging import ClipTagging


def _manifest(tmp_path, text: str):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


BASE = "inputs: [x]\nstages:\n  tagging:\n    params: {top_k: 3}\n"


def test_valid_manifest_builds_typed_stage_params(tmp_path):
    cfg = load_config(_manifest(tmp_path, BASE), ["stages.tagging.params.min_score=0.5", "output.dir=/tmp/o"])
    params = cfg.stages["tagging"].params
    assert isinstance(params, ClipTagging.Params)
    assert (params.top_k, params.min_score, cfg.output.dir) == (3, 0.5, "/tmp/o")


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("inputs: [x]\nouput: {dir: o}\n", [], "ouput"),
        ("inputs: [x]\noutput: {shard_max_samples: many}\n", [], "output.shard_max_samples"),
        (BASE, ["stages.tagging.params.top_kk=2"], "stages.tagging.params"),
        (BASE, ["stages.tagging.params.top_k=lots"], "top_k"),
        (BASE, ["stages.tagging.resources.batch_sizes=2"], "batch_sizes"),
        ("inputs: [x]\nstages:\n  tagger: {}\n", [], "stages.tagger.type"),
        ("inputs: []\n", [], "inputs"),
        (BASE, ["stages.tagging.model.dtype=int4"], "stages.tagging.model.dtype"),
    ],
)
def test_bad_config_fails_naming_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_manifest(tmp_path, text), overrides)


def test_yaml_cannot_construct_python_objects(tmp_path):
    path = _manifest(tmp_path, "inputs: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_override_must_be_key_value(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_manifest(tmp_path, BASE), ["justakey"])


def test_demo_manifest_is_valid():
    cfg = load_config("manifests/demo.yaml")
    assert cfg.stages and cfg.inputs


def test_actor_pools_that_cannot_all_start_fail_fast(tmp_path):
    from groundmill.pipeline.graph import check_resources

    cfg = load_config(
        _manifest(tmp_path, BASE),
        ["stages.tagging.resources.min_actors=2", "stages.tagging.resources.max_actors=2"],
    )
    check_resources(cfg, {"CPU": 3.0})  # load 1 + 2 actors x 1 cpu
    with pytest.raises(ConfigError, match=r"need 3 CPU.*tagging=2x1cpu.*has 2"):
        check_resources(cfg, {"CPU": 2.0})
    gpu = load_config(_manifest(tmp_path, BASE), ["stages.tagging.resources.num_gpus=0.5"])
    with pytest.raises(ConfigError, match="GPU"):
        check_resources(gpu, {"CPU": 8.0})


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_overrides_go_before_or_after_the_options(tmp_path, capsys, where):
    """`groundmill run M [--output D] [key=value ...]`: overrides are read wherever they stand, so a
    bad one fails before any work, naming the key; an unknown option is still refused."""
    manifest = _manifest(tmp_path, BASE)
    opts, override = ["--output", str(tmp_path / "o")], ["stages.tagging.params.top_kk=2"]
    argv = ["run", str(manifest), *(override + opts if where == "before" else opts + override)]
    assert main(argv) == 2
    assert "stages.tagging.params" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["run", str(manifest), "--outptu", "x"])
    assert "unrecognized arguments: --outptu" in capsys.readouterr().err


GROUPED = (
    "inputs: [x]\ngroups: {light: {batch_size: 8, max_actors: 2}}\nstages:\n"
    "  tagging: {group: light}\n  landmark: {group: light}\n  captions: {}\n"
)


def test_consecutive_group_members_become_one_segment(tmp_path):
    cfg = load_config(_manifest(tmp_path, GROUPED))
    assert [(seg.name, list(seg.stages), seg.resources.max_actors) for seg in segments(cfg)] == [
        ("light", ["tagging", "landmark"], 2),
        ("captions", ["captions"], 1),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.captions.group=heavy"], "key 'stages.captions.group': no group 'heavy'"),
        (
            ["stages.captions.group=light", "stages.landmark.group=null"],
            "'stages.captions.group'.*follow one another",
        ),
        (["groups.light.batch_size=0"], "key 'groups.light'"),
        (["groups.captions.batch_size=1"], "key 'groups.captions'.*share its name"),
    ],
)
def test_bad_groups_fail_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_manifest(tmp_path, GROUPED), overrides)


ORDERED = (
    "inputs: [x]\nstages:\n  tagging: {}\n  owl: {type: detection}\n  masks: {}\n  voting: {}\n"
    "  depth: {}\n  scene_graph: {}\n  dense_caption: {}\n  gcg: {}\n"
)


def test_stage_order_follows_provides_and_requires(tmp_path):
    cfg = load_config(_manifest(tmp_path, ORDERED))
    assert list(cfg.stages) == [
        "tagging",
        "owl",
        "masks",
        "voting",
        "depth",
        "scene_graph",
        "dense_caption",
        "gcg",
    ]
    # a disabled stage writes nothing: what needs it must go too
    with pytest.raises(ConfigError, match=r"'stages\.masks': it requires 'detections'.*\['detection'\]"):
        load_config(_manifest(tmp_path, ORDERED), ["stages.owl.enabled=false"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a required field written only later: both stages and the field are named
        (
            "inputs: [x]\nstages:\n  gcg: {}\n  scene_graph: {}\n  dense_caption: {}\n",
            r"'stages\.gcg': it requires 'dense_caption', which stage 'dense_caption' writes after it",
        ),
        # a required field nobody writes: the stage types that would
        ("inputs: [x]\nstages:\n  depth: {}\n", r"'stages\.depth': it requires 'objects'.*\['voting'\]"),
        # an optional input written only later: masks after voting would never take part in the vote
        (
            "inputs: [x]\nstages:\n  d: {type: detection}\n  voting: {}\n  masks: {}\n",
            r"'stages\.voting': it reads 'detections\.segmentation', which stage 'masks' writes after it",
        ),
    ],
)
def test_stage_order_errors_name_both_stages_and_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_manifest(tmp_path, text))
