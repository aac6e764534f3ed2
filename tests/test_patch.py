"""apply_patch / remove_patch on a tiny SD-1-style UNet: equivalences, restoration, schedule, bad input."""

import pytest
import tomesd
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from reference import ReferenceAgentSD
from tiny import tiny_scheduler, tiny_unet

import agentsd
from agentsd import AgentSDConfig, Phase
from agentsd.diffusers_patch.state import BlockState, UNetState
from agentsd.diffusers_patch.timesteps import NoiseRule
from agentsd.layout import GridLayout


@pytest.fixture(scope="module")
def unet():
    return tiny_unet("sd1").eval()


def _inputs(batch=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 5, 32, generator=g)


def _run(unet, sample, text, t=981):
    with torch.no_grad():
        return unet(sample, torch.tensor(t), encoder_hidden_states=text).sample


def _patched(unet, fn, **knobs):
    agentsd.apply_patch(unet, **knobs)
    try:
        return fn()
    finally:
        agentsd.remove_patch(unet)


def test_agents_off_equals_tomesd(unet):
    sample, text = _inputs()
    knobs = dict(ratio=0.4, sx=2, sy=2)
    ours = _patched(unet, lambda: _run(unet, sample, text), schedule="fixed", agent_ratio=0.5, use_rand=False, **knobs)
    tomesd.apply_patch(unet, use_rand=False, **knobs)
    try:
        theirs = _run(unet, sample, text)
    finally:
        tomesd.remove_patch(unet)
    assert not torch.allclose(ours, _run(unet, sample, text), atol=1e-3)  # merging did change the output
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("batch,h,w", [(2, 16, 16), (1, 16, 16), (3, 12, 20), (2, 13, 10)])
def test_agents_on_equal_an_independent_implementation(unet, batch, h, w):
    sample, text = _inputs(batch, h, w)
    phase = dict(ratio=0.4, agent_ratio=0.9, sx=4, sy=4)
    ours = _patched(unet, lambda: _run(unet, sample, text), schedule="fixed", use_rand=False, **phase)
    reference = ReferenceAgentSD(unet, **phase)
    try:
        expected = _run(unet, sample, text)
    finally:
        reference.remove()
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, _run(unet, sample, text), atol=1e-3)


def test_ratio_zero_is_bit_identical(unet):
    sample, text = _inputs()
    for schedule in ("recipe", "fixed"):
        out = _patched(unet, lambda: _run(unet, sample, text), ratio=0.0, schedule=schedule)
        assert torch.equal(out, _run(unet, sample, text))


def test_remove_restores_exactly(unet):
    sample, text = _inputs()
    before = _run(unet, sample, text)
    processors = dict(unet.attn_processors)
    attributes = {name: set(module.__dict__) for name, module in unet.named_modules()}
    agentsd.apply_patch(unet, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    assert agentsd.is_patched(unet)
    assert not torch.equal(_run(unet, sample, text), before)
    agentsd.remove_patch(unet)
    assert not agentsd.is_patched(unet)
    assert torch.equal(_run(unet, sample, text), before)
    assert all(unet.attn_processors[name] is proc for name, proc in processors.items())
    assert {name: set(module.__dict__) for name, module in unet.named_modules()} == attributes


def test_apply_twice_equals_once_and_remove_unpatched_is_a_no_op(unet):
    sample, text = _inputs()
    assert agentsd.remove_patch(unet) is unet
    once = _patched(unet, lambda: _run(unet, sample, text), ratio=0.4)
    agentsd.apply_patch(unet, ratio=0.7, schedule="fixed")
    twice = _patched(unet, lambda: _run(unet, sample, text), ratio=0.4)
    assert torch.equal(once, twice)
    assert not agentsd.is_patched(unet)


@pytest.mark.parametrize("offload_first", [True, False])
def test_remove_keeps_an_accelerate_offload_hook(offload_first):
    """``enable_model_cpu_offload`` wraps the UNet's ``forward`` with accelerate; patching before or
    after it, remove_patch must leave that hook working and the model's outputs as before."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    unet = tiny_unet("sd1")
    sample, text = _inputs()
    before = _run(unet, sample, text)
    attributes = set(unet.__dict__)
    if offload_first:
        cpu_offload_with_hook(unet, execution_device="cpu")
    agentsd.apply_patch(unet, ratio=0.5)
    if not offload_first:
        cpu_offload_with_hook(unet, execution_device="cpu")
    patched = _run(unet, sample, text)
    agentsd.remove_patch(unet)

    calls = []
    offload_hook = unet._hf_hook
    original_pre_forward = offload_hook.pre_forward

    def counting_pre_forward(module, *args, **kwargs):
        calls.append(module)
        return original_pre_forward(module, *args, **kwargs)

    offload_hook.pre_forward = counting_pre_forward
    assert not torch.equal(patched, before)
    assert torch.equal(_run(unet, sample, text), before)
    assert calls == [unet]
    remove_hook_from_module(unet)
    assert torch.equal(_run(unet, sample, text), before)
    assert set(unet.__dict__) - {"forward"} == attributes


def test_user_processors_are_kept(unet):
    sample, text = _inputs()
    mine = AttnProcessor()
    cross = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    untouched_self = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    originals = {attn: attn.processor for attn in cross + [untouched_self]}
    for attn in cross + [untouched_self]:
        attn.set_processor(mine)
    try:
        agentsd.apply_patch(unet, ratio=0.4)
        assert all(attn.processor is mine for attn in cross + [untouched_self])
        _run(unet, sample, text)
        agentsd.remove_patch(unet)
        assert all(attn.processor is mine for attn in cross + [untouched_self])
    finally:
        for attn, processor in originals.items():
            attn.set_processor(processor)


def test_seeded_runs_repeat_and_leave_the_global_rng_alone(unet):
    sample, text = _inputs()
    agentsd.apply_patch(unet, ratio=0.5, schedule="fixed", seed=7)
    try:
        state = torch.get_rng_state()
        first = _run(unet, sample, text)
        _run(unet, sample, text, t=500)  # anything in between must not matter
        second = _run(unet, sample, text)
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        agentsd.remove_patch(unet)
    other_seed = _patched(unet, lambda: _run(unet, sample, text), ratio=0.5, schedule="fixed", seed=8)
    assert torch.equal(first, second)
    assert not torch.equal(first, other_seed)


def test_odd_batches_use_the_same_plan_for_every_sample(unet):
    sample, text = _inputs(batch=1)
    triple = sample.repeat(3, 1, 1, 1), text.repeat(3, 1, 1)
    out = _patched(unet, lambda: _run(unet, *triple), ratio=0.5, schedule="fixed", use_rand=True)
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[0], out[2], atol=1e-6)


def test_unet_called_with_keywords_and_non_divisible_sizes(unet):
    # 520 x 776 px in SD 1.5 is a 65 x 97 latent: neither divides by sx = sy = 4 or 2.
    sample, text = _inputs(batch=2, h=65, w=97)
    agentsd.apply_patch(unet, ratio=0.4)
    try:
        with torch.no_grad():
            out = unet(sample=sample, timestep=torch.tensor(981), encoder_hidden_states=text).sample
            late = unet(sample=sample, timestep=torch.tensor(100), encoder_hidden_states=text).sample
        summary = agentsd.patch_summary(unet)
    finally:
        agentsd.remove_patch(unet)
    assert out.shape == sample.shape and torch.isfinite(out).all() and torch.isfinite(late).all()
    assert {block.tokens_seen for block in summary.blocks} == {65 * 97}


def test_bf16_forward_is_close_to_fp32(unet):
    sample, text = _inputs()
    full = _patched(unet, lambda: _run(unet, sample, text), ratio=0.4, attn_precision="fp32")
    low = tiny_unet("sd1").eval().to(torch.bfloat16)
    agentsd.apply_patch(low, ratio=0.4, attn_precision="fp32")
    out = _run(low, sample.bfloat16(), text.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - full).abs().max() < 0.1


def test_summary_and_default_max_downsample():
    sd1, sdxl = tiny_unet("sd1"), tiny_unet("sdxl")
    agentsd.apply_patch(sd1)
    agentsd.apply_patch(sdxl)
    s1, sx = agentsd.patch_summary(sd1), agentsd.patch_summary(sdxl)
    assert s1.max_downsample == 1 and {b.downsample for b in s1.blocks} == {1} and len(s1.blocks) == 3
    assert sx.max_downsample == 2 and {b.downsample for b in sx.blocks} == {2} and len(sx.blocks) == 8
    assert "patched 3 of 4" in str(s1)
    agentsd.apply_patch(sd1, max_downsample=2)
    assert len(agentsd.patch_summary(sd1).blocks) == 4
    assert agentsd.patch_summary(tiny_unet("sd1")) is None


def _agent_timesteps(unet, scheduler, steps):
    """Timesteps of the UNet calls that ran agent attention, and all timesteps in order."""
    seen, with_agents = [], set()
    calls = []
    original = agentsd.attention.agent_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    agentsd.attention.agent_attention = counting
    try:
        scheduler.set_timesteps(steps)
        sample, text = _inputs()
        for t in scheduler.timesteps:
            calls.clear()
            _run(unet, sample, text, t=int(t))
            seen.append(int(t))
            if calls:
                with_agents.add(int(t))
    finally:
        agentsd.attention.agent_attention = original
    return with_agents, seen


def test_recipe_switches_between_step_19_and_20_of_50_plms_steps(unet):
    agentsd.apply_patch(unet, ratio=0.4)
    try:
        with_agents, seen = _agent_timesteps(unet, tiny_scheduler(), 50)
    finally:
        agentsd.remove_patch(unet)
    steps = sorted(set(seen), reverse=True)  # PLMS repeats its first timestep; the 50 distinct steps
    assert len(steps) == 50 and steps[0] == 981 and steps[-1] == 1
    assert with_agents == set(steps[:20])  # steps 0-19: t = 981 ... 601
    assert steps[19] == 601 and steps[20] == 581


def test_custom_schedule(unet):
    schedule = [Phase(ratio=0.5, agent_ratio=0.95, sx=4, sy=4, min_t=0.9), Phase(ratio=0.3, agent_ratio=0.0)]
    agentsd.apply_patch(unet, schedule=schedule)
    try:
        with_agents, seen = _agent_timesteps(unet, tiny_scheduler(), 10)
    finally:
        agentsd.remove_patch(unet)
    assert with_agents == {t for t in seen if t >= 900}


def test_config_object_equals_keywords(unet):
    sample, text = _inputs()
    by_keywords = _patched(unet, lambda: _run(unet, sample, text), ratio=0.5)
    agentsd.apply_patch(unet, config=AgentSDConfig(ratio=0.5))
    try:
        assert torch.equal(_run(unet, sample, text), by_keywords)
    finally:
        agentsd.remove_patch(unet)


@pytest.mark.parametrize(
    "knobs,error,match",
    [
        (dict(ratio=1.0), ValueError, "ratio must be a number in \\[0, 1\\)"),
        (dict(ratio=-0.1), ValueError, "ratio"),
        (dict(ratio="0.4"), ValueError, "ratio"),
        (dict(schedule="fixed", agent_ratio=1.5), ValueError, "agent_ratio"),
        (dict(schedule="fixed", sx=0), ValueError, "sx must be an integer >= 1"),
        (dict(schedule="fixed", sy=1.5), ValueError, "sy"),
        (dict(sx=4), ValueError, "sx only applies with schedule='fixed' .* sets it itself"),
        (dict(agent_ratio=0.9, sx=4, sy=4), ValueError, "agent_ratio, sx and sy only apply with schedule='fixed'"),
        (dict(schedule="linear"), ValueError, "schedule must be 'recipe', 'fixed'"),
        (dict(schedule=[Phase(0.4, 0.5, min_t=0.5)]), ValueError, "the last 0"),
        (dict(max_downsample=0), ValueError, "max_downsample"),
        (dict(attn_precision="fp16"), ValueError, "attn_precision must be None or 'fp32'"),
        (dict(use_rand=1), TypeError, "use_rand must be True or False"),
        (dict(k_shortcut="a"), TypeError, "k_shortcut"),
        (dict(k_shortcut=float("inf")), ValueError, "k_shortcut must be a finite number"),
        (dict(k_scale2=float("nan")), ValueError, "k_scale2 must be a finite number"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(rato=0.4), TypeError, "rato"),
    ],
)
def test_bad_input_names_the_parameter_and_changes_nothing(unet, knobs, error, match):
    agentsd.apply_patch(unet, ratio=0.3)
    try:
        before = dict(unet.attn_processors)
        with pytest.raises(error, match=match):
            agentsd.apply_patch(unet, **knobs)
        assert dict(unet.attn_processors) == before
        assert agentsd.patch_summary(unet).config.ratio == 0.3
    finally:
        agentsd.remove_patch(unet)


def test_objects_without_a_unet_are_rejected():
    with pytest.raises(TypeError, match="pipeline with a `.unet` or a UNet2DConditionModel"):
        agentsd.apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be an agentsd.AgentSDConfig"):
        agentsd.apply_patch(tiny_unet("sd1"), config={"ratio": 0.4})
    with pytest.raises(TypeError, match="not both"):
        agentsd.apply_patch(tiny_unet("sd1"), config=AgentSDConfig(), ratio=0.4)


def test_processors_are_never_replaced(unet):
    """AgentSD hooks the attention modules; the processors diffusers reports are the model's own objects."""
    processors = dict(unet.attn_processors)
    agentsd.apply_patch(unet, ratio=0.4, merge_crossattn=True)
    try:
        assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
        assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor, AttnProcessor2_0)
    finally:
        agentsd.remove_patch(unet)


def test_blocks_running_one_after_another_at_a_level_draw_their_layouts_together():
    """Each block gets its own key's layout, and a run of blocks at one level draws theirs with one
    set of ops (each op is host time on a GPU); fixed layouts are drawn once per grid."""
    state = UNetState(config=AgentSDConfig(ratio=0.4, schedule="fixed", sx=2, sy=2), rule=NoiseRule(1000))
    state.blocks = [BlockState(unet=state, index=i, downsample=d) for i, d in enumerate((1, 1, 2, 2, 2, 1, 1, 1))]
    state.start_call(torch.zeros(2, 4, 16, 12), torch.tensor(981.0))
    for block in state.blocks:
        alone = GridLayout.draw(*block.grid(), 2, 2, state.keys[block.index])
        assert block.layout.src_pos.shape == (16 * 12 // block.downsample**2 * 3 // 4,)
        assert torch.equal(block.layout.dst_pos, alone.dst_pos) and torch.equal(block.layout.src_pos, alone.src_pos)

    state.start_call(torch.zeros(3, 4, 16, 12), torch.tensor(981.0))  # odd batch: fixed destinations
    assert state.keys is None
    assert len({id(block.layout) for block in state.blocks}) == 2
