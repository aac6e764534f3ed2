"""torch.compile of a patched UNet: regional (diffusers' compile_repeated_blocks) and whole-model.

Dynamo's "eager" backend traces exactly as inductor does (same graphs, guards and breaks) without
generating code, which keeps these tests fast; one case runs "aot_eager" so that the in-place index
operations also pass AOTAutograd's functionalisation.
"""

import diffusers
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from op_counter import SYNCING, CountOps
from tiny import TEXT_DIM, tiny_pipeline, tiny_unet
from torch._dynamo.utils import counters

import agentsd
import agentsd.block
from agentsd.diffusers_patch.api import get_patch
from agentsd.diffusers_patch.timesteps import HostTimesteps
from agentsd.layout import GridLayout, draw_keys
from agentsd.merge import plan_merge

#: Two agent-phase steps, two ToMe-phase steps, then the agent phase again (recipe switch at t = 600).
TIMESTEPS = (981, 961, 581, 561, 941)

#: Regional compilation is diffusers' own feature (``ModelMixin.compile_repeated_blocks`` and the UNet's
#: ``_repeated_blocks``); older releases, such as the declared floor, lack it.
needs_regional_compile = pytest.mark.skipif(
    not getattr(UNet2DConditionModel, "_repeated_blocks", None),
    reason=f"diffusers {diffusers.__version__} has no regional compilation (compile_repeated_blocks) for UNets",
)


def _inputs(kind):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    text_dim = 2 * TEXT_DIM if kind == "sdxl" else TEXT_DIM
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, text_dim, generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, TEXT_DIM, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
    return sample, kwargs


def _run(model, sample, kwargs, t):
    with torch.no_grad():
        return model(sample, torch.tensor(t), **kwargs).sample


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@needs_regional_compile
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("patch_first", [True, False], ids=["patch-then-compile", "compile-then-patch"])
def test_regional_compile_fullgraph_matches_eager_and_recompiles_once_per_phase(kind, patch_first):
    unet = tiny_unet(kind).eval()
    sample, kwargs = _inputs(kind)
    unpatched = _run(unet, sample, kwargs, TIMESTEPS[0])
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS}
    if not patch_first:
        agentsd.remove_patch(unet)

    unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    if not patch_first:
        assert torch.equal(_run(unet, sample, kwargs, TIMESTEPS[0]), unpatched)
        agentsd.apply_patch(unet, ratio=0.4)
    graphs = []
    for t in TIMESTEPS:
        assert torch.allclose(_run(unet, sample, kwargs, t), eager[t], atol=1e-4), t
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1]  # a second agent-phase step reuses the graphs
    assert graphs[1] < graphs[2] == graphs[3] == graphs[4]  # one more trace for the ToMe phase, none after
    assert not counters["graph_break"]

    agentsd.remove_patch(unet)
    assert torch.allclose(_run(unet, sample, kwargs, TIMESTEPS[0]), unpatched, atol=1e-6)


@needs_regional_compile
def test_regional_compile_with_every_stage_merged():
    """merge_crossattn and merge_mlp add a processor on attn2 and a hook on ff: still one graph per block."""
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    agentsd.apply_patch(unet, ratio=0.4, merge_crossattn=True, merge_mlp=True)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    unet.compile_repeated_blocks(fullgraph=True, backend="eager")
    for t, expected in eager.items():
        assert torch.allclose(_run(unet, sample, kwargs, t), expected, atol=1e-4)
    assert not counters["graph_break"]


@pytest.mark.parametrize(
    ("kind", "patch_first"), [("sd1", True), ("sdxl", False)], ids=["patch-then-compile-sd1", "compile-then-patch-sdxl"]
)
def test_whole_model_compiles_to_one_graph_for_the_whole_generation(kind, patch_first):
    """diffusers' own recipe, ``torch.compile(unet, fullgraph=True)``: no break, and one graph for both
    phases (the phase is a ``torch.cond`` on the timestep), equal to eager at every step. Each order of
    patching and compiling runs once, on a different family, so that both orders and both families'
    patched levels are covered."""
    unet = tiny_unet(kind).eval()
    sample, kwargs = _inputs(kind)
    unpatched = _run(unet, sample, kwargs, TIMESTEPS[0])
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS}
    if not patch_first:
        agentsd.remove_patch(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="eager")
    if not patch_first:
        assert torch.equal(_run(compiled, sample, kwargs, TIMESTEPS[0]), unpatched)
        agentsd.apply_patch(unet, ratio=0.4)
        torch._dynamo.reset()  # a compile-then-patch user recompiles once; here the count starts afresh
        counters.clear()
    for t in TIMESTEPS:
        assert torch.allclose(_run(compiled, sample, kwargs, t), eager[t], atol=1e-4), t
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    agentsd.remove_patch(unet)
    assert torch.allclose(_run(compiled, sample, kwargs, TIMESTEPS[0]), unpatched, atol=1e-6)


def test_whole_model_traces_the_branches_once_for_all_the_blocks_of_a_level():
    """Each block's merging stage is a compile region (its torch.cond inside) that dynamo traces once per
    level and calls with each block's own weights and key: inductor then lowers and generates the
    branches once, not once per block, which was most of a patched UNet's compile time."""
    unet = tiny_unet("sdxl").eval()  # its 8 patched blocks are all on one level
    sample, kwargs = _inputs("sdxl")
    agentsd.apply_patch(unet, ratio=0.4)
    graphs = []
    compiled = torch.compile(unet, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm)
    _run(compiled, sample, kwargs, TIMESTEPS[0])
    (graph,) = graphs
    calls = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 8
    assert {call.args[0].target for call in calls} == {"subgraph_0"}
    branches = [name for name, _ in graph.subgraph_0.named_children()]
    assert sorted(branches) == ["cond_false_0", "cond_true_0"]
    agentsd.remove_patch(unet)


def _canonical(graph: torch.fx.GraphModule) -> list[tuple]:
    """A graph's ops and constants, with its nodes' names (which name each block's weights) left out."""
    index = {node: i for i, node in enumerate(graph.graph.nodes)}
    return [
        (node.op, None if node.op == "placeholder" else str(node.target))
        + tuple(torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: index[arg]))
        for node in graph.graph.nodes
    ]


def test_only_a_cuda_call_with_several_phases_traces_its_stages_outside_a_region():
    traced_stage, block = agentsd.block.traced_stage, agentsd.block
    assert traced_stage(2, on_cuda=True) is block.stage_by_noise_level
    assert traced_stage(2, on_cuda=False) is block.stage_in_region
    assert traced_stage(1, on_cuda=True) is block.stage_in_region


def test_on_cuda_each_block_keeps_its_cond_at_the_top_of_the_graph(monkeypatch):
    """On CUDA the stages are not compile regions (a top-level torch.cond is one inductor sees, and it
    then leaves the graph out of CUDA graphs; in a region it might capture the cond's host read): that
    path, forced here on the CPU, still gives one graph equal to eager, and the blocks of a level trace
    to the same branch code (no block number among their constants), so inductor compiles their
    kernels once."""
    on_cuda = agentsd.block.traced_stage
    monkeypatch.setattr(agentsd.block, "traced_stage", lambda num_phases, is_cuda: on_cuda(num_phases, True))
    unet = tiny_unet("sdxl").eval()
    sample, kwargs = _inputs("sdxl")
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    graphs = []
    compiled = torch.compile(unet, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm)
    for t, expected in eager.items():
        assert torch.allclose(_run(compiled, sample, kwargs, t), expected, atol=1e-4)
    (graph,) = graphs
    calls = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert "cond" in calls and "invoke_subgraph" not in calls
    branches = {name: module for name, module in graph.named_children() if name.startswith("cond_")}
    for side in ("cond_true_", "cond_false_"):
        codes = [_canonical(module) for name, module in branches.items() if name.startswith(side)]
        assert len(codes) == 8
        assert all(code == codes[0] for code in codes), side
    agentsd.remove_patch(unet)


def _graph_ops(graph: torch.fx.GraphModule) -> set[str]:
    return {getattr(node.target, "__name__", str(node.target)) for node in graph.graph.nodes}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_compile_unet_gives_a_graph_per_phase_with_no_cond_equal_to_eager(kind, monkeypatch):
    """The compile for CUDA graphs: the hook picks the phase on the host (from the schedule's one host
    copy), so each phase is a whole graph without torch.cond, compiled once and reused by every later
    step and generation; outputs are eager's, bit for bit. Its merging stages are compile regions, one
    per block, all calling the one subgraph traced for each level."""
    unet = tiny_unet(kind).eval()
    sample, kwargs = _inputs(kind)
    agentsd.apply_patch(unet, ratio=0.4)
    timesteps = torch.tensor(TIMESTEPS)
    copies = _count_host_copies(monkeypatch)
    eager = _pipeline_loop(unet, sample, kwargs, timesteps)
    graphs = []
    assert agentsd.compile_unet(unet, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm) is unet
    for _ in range(2):  # two generations
        for out, expected in zip(_pipeline_loop(unet, sample, kwargs, timesteps), eager, strict=True):
            assert torch.equal(out, expected)
    assert len(graphs) == 2  # the agent phase's and the ToMe phase's
    assert not counters["graph_break"]
    for graph in graphs:
        ops = set().union(
            *(_graph_ops(module) for module in graph.modules() if isinstance(module, torch.fx.GraphModule))
        )
        assert "cond" not in ops
        assert not [op for op in ops if op.split(".")[0] in SYNCING]
        if hasattr(torch.compiler, "nested_compile_region"):  # torch >= 2.8
            blocks = get_patch(unet).state.blocks
            regions = [node for node in graph.graph.nodes if node.target is torch.ops.higher_order.invoke_subgraph]
            assert len(regions) == len(blocks)
            assert len({node.args[0].target for node in regions}) == len({block.downsample for block in blocks})
    assert len(copies) == 1  # the schedule, read to the host once (eager's first call): no sync per call
    agentsd.remove_patch(unet)


def test_compile_unet_goes_with_the_patch():
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    unpatched = _run(unet, sample, kwargs, TIMESTEPS[0])
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    agentsd.compile_unet(unet, fullgraph=True, backend="eager")
    for t, expected in eager.items():
        assert torch.allclose(_run(unet, sample, kwargs, t), expected, atol=1e-5), t
    assert counters["stats"]["unique_graphs"] == 2
    agentsd.apply_patch(unet, ratio=0.4)  # a new patch starts uncompiled
    _run(unet, sample, kwargs, TIMESTEPS[0])
    assert counters["stats"]["unique_graphs"] == 2
    agentsd.remove_patch(unet)
    assert "forward" not in unet.__dict__ and not hasattr(unet, "_diffusers_hook")
    assert torch.equal(_run(unet, sample, kwargs, TIMESTEPS[0]), unpatched)


def test_compile_unet_compiles_layers_whose_forward_another_library_replaced():
    """A layer's own ``forward`` from another library runs inside each phase's graph; under
    ``torch.compile(unet)`` it would run inside a torch.cond branch, where dynamo cannot trace diffusers'
    ``Attention.forward`` (its ``inspect.signature``): the whole-model compile then fails."""
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            own = block.attn1.forward
            block.attn1.forward = lambda x, *args, own=own, **kw: own(x, *args, **kw) * 1.0
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    agentsd.compile_unet(unet, fullgraph=True, backend="eager")
    for t, expected in eager.items():
        assert torch.equal(_run(unet, sample, kwargs, t), expected), t
    agentsd.remove_patch(unet)


def test_compile_unet_needs_a_patched_unet_and_torch_compiles_arguments():
    unet = tiny_unet("sd1")
    with pytest.raises(ValueError, match=r"not patched: call agentsd.apply_patch"):
        agentsd.compile_unet(unet)
    assert "forward" not in unet.__dict__
    agentsd.apply_patch(unet, ratio=0.4)
    with pytest.raises(RuntimeError, match="mode=fastest"):  # torch.compile's own check, before any change
        agentsd.compile_unet(unet, mode="fastest")
    for dynamic in (None, True):
        with pytest.raises(ValueError, match=rf"dynamic must be False \(the default\), got {dynamic}"):
            agentsd.compile_unet(unet, dynamic=dynamic)
    assert get_patch(unet).unet_forward.compiled is None
    agentsd.remove_patch(unet)


def _compile_regions(unet):
    if not getattr(type(unet), "_repeated_blocks", None):
        pytest.skip(f"diffusers {diffusers.__version__} has no compile_repeated_blocks for UNets")
    unet.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    return unet


@pytest.mark.parametrize(
    "compile",
    [
        _compile_regions,
        lambda unet: torch.compile(unet, fullgraph=True, backend="aot_eager"),
        lambda unet: agentsd.compile_unet(unet, fullgraph=True, backend="aot_eager"),
    ],
    ids=["regional", "whole", "compile_unet"],
)
def test_every_way_of_compiling_survives_aot_autograd_with_every_stage_merged(compile):
    """aot_eager runs the in-place index ops through functionalisation, which the eager backend skips."""
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    agentsd.apply_patch(unet, ratio=0.4, merge_crossattn=True, merge_mlp=True)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    compiled = compile(unet)
    for t, expected in eager.items():
        assert torch.allclose(_run(compiled, sample, kwargs, t), expected, atol=1e-4), t


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_torch_export_gives_the_eager_output_at_both_phases_with_no_host_read(strict):
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    with torch.no_grad():
        program = torch.export.export(unet, (sample, torch.tensor(981.0)), kwargs, strict=strict)
    ops = _graph_ops(program.graph_module)
    assert "cond" in ops
    assert not [op for op in ops if op.split(".")[0] in SYNCING]
    for t, expected in eager.items():
        with torch.no_grad():
            out = program.module()(sample, torch.tensor(float(t)), **kwargs).sample
        assert torch.allclose(out, expected, atol=1e-4), t
    agentsd.remove_patch(unet)


def test_aot_inductor_package_of_the_exported_unet_gives_the_eager_output_at_both_phases(tmp_path):
    """diffusers' ``test_compile_works_with_aot``: export, compile ahead of time with inductor into a
    package, load it, call it. The one inductor test of the exported graph (about a minute). A tuple
    output (``return_dict=False``): diffusers 0.33 registers its output class with pytree without the
    serialization name that packaging needs."""
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    agentsd.apply_patch(unet, ratio=0.4)
    eager = {t: _run(unet, sample, kwargs, t) for t in TIMESTEPS[1:3]}
    kwargs["return_dict"] = False
    with torch.no_grad():
        program = torch.export.export(unet, (sample, torch.tensor(981.0)), kwargs)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "unet.pt2"))
    compiled = torch._inductor.aoti_load_package(package, run_single_threaded=True)
    for t, expected in eager.items():
        with torch.no_grad():
            out = compiled(sample, torch.tensor(float(t)), **kwargs)
        assert torch.allclose(out[0], expected, atol=1e-4), t
    agentsd.remove_patch(unet)


@needs_regional_compile
def test_compiled_generation_stays_close_to_eager(tmp_path):
    """What holds under inductor (real kernels, other rounding): each call equals eager to 1e-4, and a
    whole generation stays close. It need not be equal: a ~1e-5 difference can flip which tokens merge
    at a later step (any argmax-based merge does this), and the trajectories part slightly from there.
    The UNet's transformer blocks are compiled regionally (``compile_repeated_blocks``), so inductor
    compiles a small graph per block and phase; the whole UNet through inductor is the AOT package
    test's, and one graph per generation is counted under the whole-model tests. The calls compared
    are the pipeline's own, recorded in the eager generation."""
    pipe = tiny_pipeline("sd", tmp_path)
    pipe.set_progress_bar_config(disable=True)
    agentsd.apply_patch(pipe, ratio=0.4)
    calls = []
    recording = pipe.unet.register_forward_hook(
        lambda _, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    call = dict(prompt="a photo of a cat", num_inference_steps=5, output_type="np")
    eager = pipe(generator=torch.Generator().manual_seed(0), **call).images
    recording.remove()
    summary = agentsd.patch_summary(pipe)
    first_and_last = (calls[0], calls[-1])
    phases = [summary.config.phase_at(float(args[1]), summary.num_train_timesteps) for args, _, _ in first_and_last]
    assert phases == list(summary.config.phases)  # the agent phase, then the ToMe phase
    pipe.unet.compile_repeated_blocks(fullgraph=True)
    for args, kwargs, expected in first_and_last:
        with torch.no_grad():
            assert torch.allclose(pipe.unet(*args, **kwargs)[0], expected, atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    compiled = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert np.abs(compiled - eager).max() < 1e-2
    assert counters["stats"]["unique_graphs"] == graphs  # both phases compiled above; no step recompiles
    assert not counters["graph_break"]


def _count_host_copies(monkeypatch) -> list:
    """A list that gets an entry each time a patched UNet copies a timestep's storage to the host."""
    copies = []
    copy = HostTimesteps.copy
    monkeypatch.setattr(HostTimesteps, "copy", lambda self, *a: copies.append(a) or copy(self, *a))
    return copies


def _pipeline_loop(unet, sample, kwargs, timesteps):
    """UNet calls as a pipeline makes them: one per element view of the scheduler's timesteps."""
    with torch.no_grad():
        return [unet(sample, t, **kwargs).sample for t in timesteps]


def test_patched_calls_add_no_host_sync_and_read_the_schedule_to_the_host_once(monkeypatch):
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    timesteps = torch.tensor(TIMESTEPS)
    plain = []
    for t in timesteps:
        with CountOps() as ops:
            _pipeline_loop(unet, sample, kwargs, [t])
        plain.append(ops.syncs)
    agentsd.apply_patch(unet, ratio=0.4)
    assert len(agentsd.patch_summary(unet).blocks) == 3  # merging blocks, each free of syncs
    expected = [_run(unet, sample, kwargs, t) for t in TIMESTEPS]  # fresh 0-d tensors, each copied alone
    copies = _count_host_copies(monkeypatch)
    for t, syncs, want in zip(timesteps, plain, expected, strict=True):
        with CountOps() as ops:
            (out,) = _pipeline_loop(unet, sample, kwargs, [t])
        assert ops.syncs == syncs, int(t)  # nothing beyond what the unpatched UNet does itself
        assert torch.equal(out, want), int(t)  # the phase and destinations of that timestep
    assert len(copies) == 1  # the whole schedule, at the first call

    timesteps[2:] = torch.tensor([981, 961, 581])  # rewritten in place: read afresh, phases follow
    outs = _pipeline_loop(unet, sample, kwargs, timesteps[2:])
    assert len(copies) == 2
    assert all(torch.equal(out, expected[i]) for out, i in zip(outs, (0, 1, 2), strict=True))
    agentsd.remove_patch(unet)


@pytest.mark.parametrize("kind", ["sd", "img2img"])
def test_a_pipeline_copies_its_schedule_to_the_host_once_per_generation(kind, tmp_path, monkeypatch):
    """diffusers' pipelines pass views of ``scheduler.timesteps`` (img2img: of a slice of it)."""
    pipe = tiny_pipeline(kind, tmp_path)
    agentsd.apply_patch(pipe, ratio=0.4)
    copies = _count_host_copies(monkeypatch)
    call = dict(prompt="a photo of a cat", num_inference_steps=4, output_type="np")
    if kind == "img2img":
        call["image"] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for generation in (1, 2):
        pipe(generator=torch.Generator().manual_seed(0), **call)
        assert len(copies) == generation  # set_timesteps makes a new tensor per generation


class _TensorSubclass(torch.Tensor):
    pass


@pytest.mark.parametrize("make", ["python-number", "inference-tensor", "tensor-subclass", "batched-view"])
def test_a_timestep_of_any_form_picks_its_phase(make):
    """Numbers, inference tensors and subclasses are read directly (no host copy); a batched view at its offset."""
    unet = tiny_unet("sd1").eval()
    sample, kwargs = _inputs("sd1")
    agentsd.apply_patch(unet, ratio=0.4)
    for value in (981, 581):
        expected = _run(unet, sample, kwargs, value)
        if make == "python-number":
            timestep = value
        elif make == "inference-tensor":
            with torch.inference_mode():
                timestep = torch.tensor([0, value])[1]
        elif make == "tensor-subclass":
            timestep = torch.tensor([7, value]).as_subclass(_TensorSubclass)[1]
        else:
            timestep = torch.tensor([7, value, value])[1:]
        with torch.no_grad():
            assert torch.equal(unet(sample, timestep, **kwargs).sample, expected), (make, value)
    agentsd.remove_patch(unet)


@pytest.mark.parametrize("sx,agent_r", [(4, 60), (2, 0)], ids=["agents", "tome"])
def test_plan_merge_compiles_fullgraph_with_the_same_plan(sx, agent_r):
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    layout = GridLayout.draw(8, 8, sx, sx, draw_keys(1, torch.tensor(981.0), 1)[0])

    def merged(metric):
        plan = plan_merge(metric, layout, r=25, agent_r=agent_r)
        agents = plan.agents.merge(metric) if plan.agents is not None else None
        return plan.unmerge(plan.merge(metric)), agents

    compiled = torch.compile(merged, fullgraph=True, backend="eager")
    (expected, expected_agents), (ours, our_agents) = merged(x), compiled(x)
    assert torch.equal(ours, expected)
    assert (our_agents is None) == (expected_agents is None)
    if expected_agents is not None:
        assert torch.equal(our_agents, expected_agents)
