"""The registry of compared methods (eval/methods.py), on the tiny pipelines of tests/tiny.py.

Each method must apply, change the output, reproduce it from the same seeds, and leave the
pipeline as it was (same outputs bit for bit, no attribute left behind); the stacks must not
depend on the order of their parts; bad names fail naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import method_options  # noqa: E402
import method_parts  # noqa: E402
import methods as m  # noqa: E402
import todo  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from tiny import TEXT_DIM, tiny_pipeline, tiny_unet  # noqa: E402

STEPS = 5
#: DeepCache caches on 2 of every 3 steps, T-GATE gates within the 5 steps.
OPTIONS = m.MethodOptions(tgate_gate_step=3, tgate_warm_up=0, tgate_sp_interval=2)
AVAILABLE = [name for name, method in m.METHODS.items() if method.unavailable() is None]


def available(*names: str) -> list:
    """``names`` as test parameters, each skipped with the reason where its method cannot run here."""
    return [
        pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=str(m.METHODS[name].unavailable())))
        for name in names
    ]


def ratio_of(method: m.Method) -> float | None:
    return 0.5 if method.uses_ratio else None


def generate(call) -> torch.Tensor:
    images = call(
        prompt="a photo of a cat",
        num_inference_steps=STEPS,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    return torch.from_numpy(images)


def run(method: m.Method, pipe) -> torch.Tensor:
    torch.manual_seed(0)  # tomesd and CA-ToMe fork the global RNG at their first call
    with method.applied(pipe, ratio=ratio_of(method), seed=3, options=OPTIONS) as call:
        return generate(call)


def instance_state(pipe) -> list:
    """Every instance attribute name (and the identity of any ``forward``) and class of the pipeline and UNet."""
    return [
        (type(obj), sorted(vars(obj)), id(vars(obj).get("forward")))
        for obj in [pipe, *pipe.unet.modules(), *pipe.unet.attn_processors.values()]
    ]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tiny_pipeline("sd", tmp_path_factory.mktemp("sd"))
    base = generate(pipe)  # the first call sets the pipeline's own call state (_guidance_scale, ...)
    return pipe, base


def test_the_registry_holds_every_compared_method():
    assert list(m.METHODS)[:5] == ["sd", "tomesd", "agentsd", "agent-phase", "tome-phase"]
    for name in (
        "ca-tome",
        "deepcache",
        "tgate",
        "agentsd+deepcache",
        "tomesd+deepcache",
        "ceiling",
        "todo",
        "hidiffusion",
    ):
        assert name in m.METHODS
    assert [name for name, method in m.METHODS.items() if method.timing_only] == ["ceiling"]
    assert {name for name, method in m.METHODS.items() if method.needs_pipeline} == {
        "ca-tome",
        "deepcache",
        "hidiffusion",
        "tgate",
        "agentsd+deepcache",
        "tomesd+deepcache",
    }


#: HiDiffusion recognises only the module layouts of SD 1.5/2.1/XL, not the tiny UNet: tested on its own below.
TINY_SD = [name for name in m.METHODS if name != "hidiffusion"]


@pytest.mark.parametrize("name", available(*TINY_SD))
def test_each_method_applies_reproduces_and_removes_cleanly(sd, name):
    pipe, base = sd
    method = m.METHODS[name]
    state = instance_state(pipe)
    first = run(method, pipe)
    assert instance_state(pipe) == state, "attributes left behind"
    assert torch.equal(run(method, pipe), first), "not reproducible from the same seeds"
    if method is m.BASELINE:
        assert torch.equal(first, base)
    else:
        assert not torch.equal(first, base), "the method changed nothing"
    assert torch.equal(generate(pipe), base), "the pipeline generates differently after removal"


@pytest.mark.parametrize("name", available("agentsd+deepcache"))
def test_removal_happens_even_when_the_block_raises(sd, name):
    pipe, _ = sd
    state = instance_state(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with m.METHODS[name].applied(pipe, ratio=0.5, options=OPTIONS):
            raise RuntimeError("boom")
    assert instance_state(pipe) == state


@pytest.mark.parametrize("name", available(*(name for name in m.METHODS if "+" in name)))
def test_stacks_give_the_same_output_in_either_order(sd, name):
    pipe, _ = sd
    method = m.METHODS[name]
    reversed_order = dataclasses.replace(method, parts=method.parts[::-1])
    assert torch.equal(run(reversed_order, pipe), run(method, pipe))


@pytest.mark.parametrize("name", available("tgate", "agentsd+deepcache"))
def test_pipeline_methods_run_on_sdxl(tmp_path, name):
    pipe = tiny_pipeline("sdxl", tmp_path)
    base, state = generate(pipe), instance_state(pipe)
    assert not torch.equal(run(m.METHODS[name], pipe), base)
    assert instance_state(pipe) == state
    assert torch.equal(generate(pipe), base)


@pytest.mark.parametrize("name", available("tgate", "ca-tome"))
def test_peers_refuse_pipelines_their_loops_do_not_cover_before_changing_anything(tmp_path, name):
    pipe = tiny_pipeline("img2img", tmp_path)
    state = instance_state(pipe)
    with pytest.raises(TypeError, match=f"{name} needs a diffusers StableDiffusionPipeline"):
        with m.METHODS[name].applied(pipe):
            pass
    assert instance_state(pipe) == state


@pytest.mark.parametrize("name", available("tomesd", "agentsd", "ceiling", "todo"))
def test_unet_only_methods_patch_a_bare_unet_at_the_top_attention_level(name):
    """SDXL has no attention at full latent resolution: each must patch the level below (max_downsample 2)."""
    unet = tiny_unet("sdxl")
    torch.manual_seed(1)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}

    def forward() -> torch.Tensor:
        torch.manual_seed(0)
        return unet(sample, 981, encoder_hidden_states=text, added_cond_kwargs=added).sample

    base = forward()
    method = m.METHODS[name]
    with method.applied(unet, ratio=ratio_of(method)):
        patched = forward()
    assert not torch.equal(patched, base)
    assert torch.equal(forward(), base)


def test_the_ceiling_skips_self_attention_exactly_in_agentsds_blocks(sd):
    import agentsd

    pipe, _ = sd
    agentsd.apply_patch(pipe)
    expected = {f"{block.name}.attn1" for block in agentsd.patch_summary(pipe).blocks}
    agentsd.remove_patch(pipe)
    processors = dict(pipe.unet.named_modules())
    before = {name: processors[name].processor for name in processors if name.endswith(("attn1", "attn2"))}
    with m.METHODS["ceiling"].applied(pipe):
        skipped = {name for name in before if isinstance(processors[name].processor, method_parts.SkipAttention)}
    assert skipped == expected and expected
    assert all(processors[name].processor is processor for name, processor in before.items())


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_the_ceiling_on_a_diffusion_transformer_skips_every_image_attention_whole(arch):
    """Every block's image attention costs nothing and returns what the model reads: the (image, text)
    pair of a joint layer, SD3's last context-pre-only block's included, Flux's single-stream sequence."""
    from transformer_configs import TRANSFORMER_ARCHS

    import agentsd

    model = TRANSFORMER_ARCHS[arch].build()
    inputs = TRANSFORMER_ARCHS[arch].inputs(model, 1, 64, 981, torch.Generator().manual_seed(0))
    layers = [attn for site in agentsd.select_blocks(model) for attn, _ in todo.image_attentions(site.module)]
    assert len(layers) == {"tiny-sd3": 3, "tiny-flux": 2, "tiny-pixart": 2}[arch]  # SD3: block 0's attn and attn2
    before = [attn.processor for attn in layers]
    with torch.inference_mode():
        base = model(**inputs).sample
        with m.METHODS["ceiling"].applied(model) as generate:
            assert all(isinstance(attn.processor, method_parts.SkipAttention) for attn in layers)
            skipped = generate(**inputs).sample
    assert skipped.shape == base.shape and not torch.equal(skipped, base)
    assert [attn.processor for attn in layers] == before


@pytest.mark.parametrize("name", available("tomesd"))
def test_tomesd_refuses_a_diffusion_transformer_by_name(name):
    from transformer_configs import TRANSFORMER_ARCHS

    with pytest.raises(TypeError, match="tomesd patches a UNet's transformer blocks; PixArtTransformer2DModel"):
        with m.METHODS[name].applied(TRANSFORMER_ARCHS["tiny-pixart"].build(), ratio=0.4):
            pass


@pytest.mark.parametrize("name", available("deepcache", "agentsd+deepcache", "tgate", "ca-tome", "hidiffusion"))
def test_pipeline_methods_refuse_a_bare_unet(name):
    with pytest.raises(TypeError, match="needs a pipeline"):
        with m.METHODS[name].applied(tiny_unet("sd1"), ratio=ratio_of(m.METHODS[name])):
            pass


def test_ratio_given_exactly_to_the_methods_that_take_one():
    with pytest.raises(ValueError, match="takes a merge ratio"):
        m.METHODS["agentsd"].settings(None)
    with pytest.raises(ValueError, match="takes no merge ratio"):
        m.METHODS["deepcache"].settings(0.4)


def test_settings_are_json_records_of_what_shapes_the_output():
    import json

    for name, method in m.METHODS.items():
        record = method.settings(ratio_of(method), OPTIONS)
        assert json.loads(json.dumps(record)) == record and record["method"] == name
    assert m.METHODS["agent-phase"].settings(0.4)["agentsd"] == {
        "schedule": "fixed",
        "sx": 4,
        "sy": 4,
        "agent_ratio": 0.95,
    }
    changed = dataclasses.replace(m.MethodOptions(), deepcache_interval=5)
    assert m.METHODS["agentsd+deepcache"].settings(0.4, changed)["deepcache"]["cache_interval"] == 5
    assert m.METHODS["agentsd"].settings(0.4, changed) == m.METHODS["agentsd"].settings(0.4)


def test_variants_baseline_first_then_unratioed_then_each_ratio():
    chosen = [m.METHODS[n] for n in ("agentsd", "deepcache", "sd", "agentsd+deepcache")]
    assert [v.name for v in m.variants(chosen, [0.4, 0.5, 0.4])] == [
        "sd",
        "deepcache",
        "agentsd-r0.4",
        "agentsd+deepcache-r0.4",
        "agentsd-r0.5",
        "agentsd+deepcache-r0.5",
    ]
    assert m.Variant(m.METHODS["tomesd"], 0.4).label == "ToMeSD r=0.4"


def parser(timing: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    m.add_method_arguments(p, default=["sd", "agentsd"], timing=timing)
    return p


def test_help_lists_every_method_and_knob_with_defaults():
    # argparse wraps lines at hyphens too ("cross- attention"): join those back.
    text = " ".join(parser().format_help().split()).replace("- ", "-")
    for name, method in m.METHODS.items():
        assert f"{name}: {' '.join(method.summary.split())}".replace("- ", "-") in text
    for f in dataclasses.fields(m.MethodOptions):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: sd agentsd)" in text and "(default: 3)" in text and "(default: CONFIG_3)" in text
    assert "ceiling" not in parser(timing=False).format_help()
    with_defaults = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_method_arguments(with_defaults, default=["sd"])
    assert with_defaults.format_help().count("(default:") == 1 + len(dataclasses.fields(m.MethodOptions))


def test_flags_choose_the_options_and_bad_values_name_the_flag():
    args = parser().parse_args(["--methods", "sd,agentsd", "ceiling", "sd", "--deepcache-interval", "5"])
    assert [x.name for x in m.resolve_methods(args.methods)] == ["sd", "agentsd", "ceiling"]
    assert m.options_from(args) == dataclasses.replace(m.MethodOptions(), deepcache_interval=5)
    with pytest.raises(ValueError, match="--deepcache-interval: must be >= 1, got 0"):
        m.options_from(parser().parse_args(["--deepcache-interval", "0"]))
    with pytest.raises(ValueError, match=r"--ca-tome-threshold: must be in \[-1, 1\]"):
        m.MethodOptions(ca_tome_threshold=1.5)


def test_unknown_and_timing_only_names_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--methods: unknown method 'deep-cache'; choose from sd, tomesd, .*ceiling"):
        m.resolve_methods(["sd", "deep-cache"])
    with pytest.raises(ValueError, match="--methods: 'ceiling' only measures speed"):
        m.resolve_methods(["ceiling"], timing=False)
    with pytest.raises(ValueError, match="--methods: name at least one method"):
        m.resolve_methods([" , "])


def test_unavailable_peers_stay_listed_and_are_refused_with_the_reason(monkeypatch, tmp_path):
    (tmp_path / "broken_peer.py").write_text("raise ImportError('needs diffusers<0.30')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    missing = m.Part(lambda *a: lambda: None, lambda r, o: {}, package="no_such_peer_xyz", install="no-such-peer")
    broken = dataclasses.replace(missing, package="broken_peer", install="broken-peer")
    monkeypatch.setitem(m.METHODS, "missing", m.Method("missing", "Missing", "a peer", False, parts=(missing,)))
    monkeypatch.setitem(m.METHODS, "broken", m.Method("broken", "Broken", "a peer", False, parts=(broken,)))
    assert "missing" in parser().format_help()
    with pytest.raises(ValueError, match="--methods: method 'missing' cannot run here: .*pip install no-such-peer"):
        m.resolve_methods(["sd", "missing"])
    with pytest.raises(
        ValueError, match="'broken' cannot run here: .*fails to import with diffusers .*needs diffusers<0.30"
    ):
        m.resolve_methods(["broken"], flag="--runs")
    with pytest.raises(RuntimeError, match="cannot run here"):
        with m.METHODS["missing"].applied(object()):
            pass


@pytest.mark.skipif("ca-tome" not in AVAILABLE, reason=str(m.METHODS["ca-tome"].unavailable()))
def test_ca_tome_cache_names_are_the_packages_own():
    from ca_tome import CacheConf

    assert {name for name in vars(CacheConf) if not name.startswith("_")} == set(method_options.CA_TOME_CACHES)


@pytest.mark.skipif("hidiffusion" in AVAILABLE, reason="hidiffusion runs here")
def test_hidiffusion_stays_listed_and_is_refused_with_the_reason_where_it_cannot_run():
    """hidiffusion 0.1.10 imports diffusers.pipelines.controlnet.multicontrolnet, which diffusers 0.41 removed."""
    reason = m.METHODS["hidiffusion"].unavailable()
    assert "pip install hidiffusion" in reason or "fails to import with diffusers" in reason
    assert "hidiffusion: HiDiffusion" in " ".join(parser().format_help().split())
    with pytest.raises(ValueError, match="--methods: method 'hidiffusion' cannot run here: "):
        m.resolve_methods(["sd", "hidiffusion"])


@pytest.fixture
def hidiffusion_importable(monkeypatch):
    """hidiffusion, importable for this test: on diffusers >= 0.41 the module it imports, gone from the
    path it uses (deprecated there since 0.31), is aliased from where diffusers keeps it now.

    Tests the registry's apply and remove against the real package on this diffusers; afterwards
    the alias and the modules imported through it are gone and availability is checked afresh.
    """
    if find_spec("hidiffusion") is None:
        pytest.skip("hidiffusion is not installed: pip install hidiffusion")
    old, new = "diffusers.pipelines.controlnet.multicontrolnet", "diffusers.models.controlnets.multicontrolnet"
    if find_spec(old) is None:
        monkeypatch.setitem(sys.modules, old, importlib.import_module(new))
    method_parts.import_problem.cache_clear()
    assert m.METHODS["hidiffusion"].unavailable() is None
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "hidiffusion"]:
        del sys.modules[name]
    method_parts.import_problem.cache_clear()


def sd15_layout_pipeline(folder) -> StableDiffusionPipeline:
    """A tiny pipeline whose UNet has SD 1.5's module names (hidiffusion recognises its models by them)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    components = {**tiny_pipeline("sd", folder).components, "unet": unet}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_hidiffusion_applies_and_removes_exactly(tmp_path, hidiffusion_importable):
    method = m.METHODS["hidiffusion"]
    other = tiny_pipeline("sd", tmp_path / "other")
    other.register_to_config(_name_or_path="tiny-sd")
    state, upsamplers = instance_state(other), other.unet.num_upsamplers
    with pytest.raises(TypeError, match="hidiffusion: tiny-sd is not a supported model"):
        run(method, other)
    assert instance_state(other) == state and other.unet.num_upsamplers == upsamplers
    pipe = sd15_layout_pipeline(tmp_path)
    state = instance_state(pipe)
    with pytest.raises(TypeError, match="pipe.name_or_path, which is None"):
        run(method, pipe)
    assert instance_state(pipe) == state
    pipe.register_to_config(_name_or_path="tiny-sd15-layout")
    base, state, upsamplers = generate(pipe), instance_state(pipe), pipe.unet.num_upsamplers
    assert not torch.equal(run(method, pipe), base)
    assert instance_state(pipe) == state and pipe.unet.num_upsamplers == upsamplers
    assert torch.equal(generate(pipe), base)
