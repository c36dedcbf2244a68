"""One template for every method (`tta.method`), the registry (`tta.registry`) and the shipped config files:
every method is built by name and from a YAML file, fields reach the optimizer, misspelt keys name the nearest."""
import copy
import inspect
from pathlib import Path

import pytest
import torch
from helpers import tiny_vit

from imse_kernels.eval.run_config import RUN, load_config_file, resolve
from imse_kernels.tta import (
    IMSE,
    REGISTRY,
    SAR,
    ConfigError,
    IMSEConfig,
    Method,
    SARConfig,
    Source,
    TentConfig,
    build,
    make_config,
    names,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs" / "imagenet_c").glob("*.yaml"))
SEVEN = ("source", "tent", "sar", "eata", "cotta", "deyo", "imse")


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_every_method_is_registered_and_built_by_name():
    assert set(SEVEN) | {"imse-mix", "imse-nodiv"} == set(names())
    model = tiny_vit(seed=0)
    for name in names():
        adapter = build(name, copy.deepcopy(model), source=[images(4, 9)])
        assert type(adapter) is REGISTRY[name].cls, name
        out = adapter(images())
        assert out.shape == (4, 10) and torch.isfinite(out).all() and not out.requires_grad, name
    assert build("imse-mix", tiny_vit(seed=0)).config.retrieval == "mix"
    assert build("imse-nodiv", tiny_vit(seed=0)).config.diversity_weight == 0.0
    assert build("imse", tiny_vit(seed=0)).probe


def test_every_constructor_is_the_template():
    for name, e in REGISTRY.items():
        if e.cls is Source:
            continue
        params = inspect.signature(e.cls.__init__).parameters
        assert list(params)[:3] == ["self", "model", "config"], name
        assert params["config"].default is None and params["compile"].default is False, name
        assert params["compile"].kind is inspect.Parameter.KEYWORD_ONLY and issubclass(e.cls, Method), name


def test_fields_as_keywords_and_config_objects_reach_the_optimizer():
    a = build("sar", tiny_vit(seed=0), lr=5e-4, rho=0.07)
    b = build("sar", tiny_vit(seed=0), SARConfig(lr=5e-4, rho=0.07))
    c = SAR(tiny_vit(seed=0), lr=5e-4, rho=0.07)
    for adapter in (a, b, c):
        g = adapter.optimizer.param_groups[0]
        assert (g["lr"], g["rho"], adapter.config.lr) == (5e-4, 0.07, 5e-4)
    tent = build("tent", tiny_vit(seed=0), TentConfig(optim="sgd", momentum=0.5), lr=0.02)
    assert isinstance(tent.optimizer, torch.optim.SGD) and tent.optimizer.param_groups[0]["momentum"] == 0.5
    assert tent.optimizer.param_groups[0]["lr"] == 0.02


def test_misspelt_names_and_keys_name_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown method 'sra' \(did you mean 'sar'\?\)"):
        build("sra", tiny_vit(seed=0))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lrr' \(did you mean 'lr'\?\)"):
        build("sar", tiny_vit(seed=0), lrr=1e-3)
    with pytest.raises(TypeError, match=r"SAR\(\) got an unexpected keyword argument 'rh' \(did you mean 'rho'\?\)"):
        SAR(tiny_vit(seed=0), rh=0.1)
    with pytest.raises(ConfigError, match=r"unknown key 'imse.retreival' \(did you mean 'imse.retrieval'\?\)"):
        make_config("imse", {"retreival": "mix"})
    with pytest.raises(ConfigError, match="source has no hyper-parameters"):
        make_config("source", {"lr": "1"})
    with pytest.raises(ConfigError, match="SARConfig: lr must be > 0"):
        make_config("sar", {"lr": "-1"})
    with pytest.raises(ConfigError, match="SARConfig: lr cannot be read from 'fast'"):
        make_config("sar", {"lr": "fast"})
    with pytest.raises(ConfigError, match="SARConfig: steps must be an int"):
        SARConfig(steps=1.5)


def test_text_values_are_read_as_the_fields_types():
    cfg = make_config("imse-mix", {"lr": "3e-3", "betas": "0.8,0.99", "adapt_blocks": "[0, 1]", "episodic": "true",
                                   "max_entries": "none"})
    assert (cfg.lr, cfg.betas, cfg.adapt_blocks, cfg.episodic, cfg.max_entries) == (3e-3, (0.8, 0.99), (0, 1),
                                                                                    True, None)
    assert cfg.retrieval == "mix", "the preset stays unless overridden"
    assert make_config("imse-mix", {"retrieval": "top1"}).retrieval == "top1"


def test_run_fields_follow_the_run_unless_set():
    sar = build("sar", tiny_vit(seed=0), batch_size=16)
    assert sar.config.batch_size == 16 and sar.lr == 0.001 / 64 * 16
    pinned = build("sar", tiny_vit(seed=0), SARConfig(batch_size=32), batch_size=16)
    assert pinned.lr == 0.001 / 64 * 32, "a batch size set in the config is kept"
    assert build("cotta", tiny_vit(seed=0), seed=5).config.seed == 5
    assert build("deyo", tiny_vit(seed=0), seed=5).config.seed == 5
    assert build("deyo", tiny_vit(seed=0), make_config("deyo", {"seed": "2"}), seed=5).config.seed == 2


def test_source_data_goes_one_way_to_the_methods_that_use_it():
    src = [images(4, 9)]
    eata = build("eata", tiny_vit(seed=0), source=src)
    assert eata.fisher is not None
    imse = build("imse", tiny_vit(seed=0), source=src)
    assert imse.bank.entries[0].stats is not None
    direct = IMSE(tiny_vit(seed=0), IMSEConfig(), source=src)
    assert torch.equal(direct.bank.entries[0].stats.mean, imse.bank.entries[0].stats.mean)
    tent = build("tent", tiny_vit(seed=0), source=src)  # the registry gives source data only to the methods using it
    with pytest.raises(TypeError, match="Tent uses no clean source data"):
        tent.prepare(src)
    with pytest.raises(TypeError, match="SAR uses no clean source data"):
        SAR(tiny_vit(seed=0), source=src)
    with pytest.raises(ValueError, match="does not adapt data-parallel"):
        SAR(tiny_vit(seed=0), process_group=object())


def test_episodic_restores_state_but_counts_on():
    sar = build("sar", tiny_vit(seed=0), episodic=True, reset_constant=0.0, entropy_margin=1.0)
    start = [p.detach().clone() for p in sar.params]
    a = sar(images(seed=1))
    b = sar(images(seed=1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sar.steps_taken == 2 and any(not torch.equal(p, q) for p, q in zip(sar.params, start))


@pytest.mark.parametrize("name", ["sar", "eata", "cotta", "deyo"])
def test_compile_reaches_every_method(name):
    """compile= (the template's) runs the method's forward through torch.compile and changes nothing else."""
    kw = {"cotta": dict(confidence_threshold=0.0), "deyo": dict(plpd_threshold=-1.0, deyo_margin=1.0),
          "eata": dict(d_margin=1.0, entropy_margin=1.0), "sar": dict(entropy_margin=1.0)}[name]
    model = tiny_vit(seed=0)
    eager = build(name, copy.deepcopy(model), **kw)
    compiled = build(name, copy.deepcopy(model), compile="aot_eager", **kw)
    assert eager._compiled is None and compiled._compiled is not None
    for b in (4, 4, 3):
        x = images(b, seed=b)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    for p, q in zip(eager.params, compiled.params):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    assert compiled.steps_taken == eager.steps_taken == 3


# ------------------------------------------------------------------------------------------------ config files
def test_the_shipped_default_config_is_the_embedded_default():
    assert resolve([load_config_file(REPO / "configs" / "digits" / "default.yaml")]).record() == resolve([]).record()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_method_builds_from_its_yaml_file(path):
    """configs/imagenet_c/<method>.yaml: every key of its method sections is written out and resolves; each
    selected method builds from it and adapts (on a small ViT: the file's model and data are ImageNet's)."""
    sections = load_config_file(path)
    resolved = resolve([sections])
    assert resolved.run.data == "imagenet-c" and resolved.run.model == "vit_base_patch16_224"
    assert resolved.run.batch_size == 64 and resolved.run.severity == 5 and resolved.run.setting == "continual"
    assert path.stem in resolved.methods
    for name, cfg in resolved.methods.items():
        given = sections.get(name, {})
        if name == path.stem and cfg is not None:
            assert sorted(given) == sorted(cfg.keys()), f"{path.name}: {name} writes out every field"
        adapter = build(name, tiny_vit(seed=0), cfg, batch_size=resolved.run.batch_size, seed=0)
        assert adapter(images()).shape == (4, 10)
        if cfg is not None:
            assert adapter.config == cfg.__class__(**{**cfg.__dict__, "batch_size": 64,
                                                      **({"seed": 0} if hasattr(cfg, "seed") else {})})


@pytest.mark.parametrize("name", ["sar", "eata", "deyo", "imse"])
def test_authors_files_state_the_defaults(name):
    """The baselines whose authors give a ViT-B/16 ImageNet-C setting: the file and the dataclass agree, so the
    defaults are the authors' (Tent's and CoTTA's files hold the ViT setting of the IMSE/ViDA comparison)."""
    sections = load_config_file(REPO / "configs" / "imagenet_c" / f"{name}.yaml")
    assert make_config(name, sections[name]) == make_config(name)
    assert RUN in sections
