"""Placement before weights: accelerate's state, this rank's device, the storage dtype, and what one
checkpoint costs each process's host memory under DDP, FSDP and ZeRO-3 (real 2-process launches)."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO
from test_config import composed

from train.config import ConfigError, load_config
from train.model.build import weights_dtype
from train.model.placement import Placement, place_processes
from train.run.trainer import training_args


def config_of(*overrides: str):
    return load_config(composed("training.report_to=[]", *overrides))


def test_one_process_is_placed_on_cpu_here(tmp_path):
    config = config_of()
    placement = place_processes(config.launch, training_args(config, tmp_path, torch.float32))
    assert (placement.rank, placement.local_rank, placement.world_size) == (0, 0, 1)
    assert placement.device == torch.device("cpu") and placement.engine == "NO"
    assert not placement.loads_on_rank_zero and not placement.zero3_init
    assert placement.device_map == {"": torch.device("cpu")}


def test_several_gpus_under_launch_local_are_refused_before_anything_loads(tmp_path, monkeypatch):
    """No GPU here: the device count is the one thing faked; the refusal comes before CUDA is touched."""
    config = config_of()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as error:
        place_processes(config.launch, args=None)  # refused before the arguments are even looked at
    message = str(error.value)
    assert "8 GPUs are visible to one process" in message and "nn.DataParallel" in message
    assert "python -m launch launch=ddp launch.num_processes=8 launch.run=true" in message
    assert "CUDA_VISIBLE_DEVICES=0 python -m train" in message


def test_quantized_weights_go_to_this_ranks_own_gpu():
    """bitsandbytes quantizes on the device it loads to: rank 3's weights on cuda:3, not on GPU 0; as a
    torch.device, which transformers' kernel mapping reads a device type from (an int there raised
    AttributeError: 'int' object has no attribute 'type', on every QLoRA rank >= 1)."""
    from transformers.utils.import_utils import get_device_type

    placement = Placement(
        rank=11, local_rank=3, world_size=16, device=torch.device("cuda", 3), engine="MULTI_GPU",
        loads_on_rank_zero=False, zero3_init=False,
    )  # fmt: skip
    assert placement.device_map == {"": torch.device("cuda", 3)}
    assert get_device_type(next(iter(placement.device_map.values()))) == "cuda"
    assert not placement.is_main and not placement.is_local_main and not placement.shards_4bit


def test_the_engine_is_known_before_the_trainer_builds_its_accelerator():
    """On CUDA, PartialState says MULTI_GPU for every launch; FSDP and DeepSpeed are the Accelerator's word,
    later. Placement reads them from the launcher's variables, so an FSDP launch on GPUs loads QLoRA sharded
    (shards_4bit) and stores 4-bit weights in the compute dtype, as on CPU."""
    from accelerate.utils import DistributedType

    from train.model.placement import launch_engine

    fsdp, zero = {"ACCELERATE_USE_FSDP": "true"}, {"ACCELERATE_USE_DEEPSPEED": "true"}
    assert launch_engine(DistributedType.MULTI_GPU, fsdp) == DistributedType.FSDP
    assert launch_engine(DistributedType.MULTI_CPU, fsdp) == DistributedType.FSDP
    assert launch_engine(DistributedType.MULTI_GPU, zero) == DistributedType.DEEPSPEED
    assert launch_engine(DistributedType.MULTI_GPU, {}) == DistributedType.MULTI_GPU
    assert launch_engine(DistributedType.NO, {}) == DistributedType.NO


@pytest.mark.parametrize(
    ("method", "engine", "stored"),
    [
        ("full", "NO", torch.float32),  # fp32 master weights, bf16 autocast
        ("full", "MULTI_GPU", torch.float32),
        ("full", "FSDP", torch.bfloat16),  # accelerate upcasts the trainable shards to fp32 itself
        ("full", "DEEPSPEED", torch.bfloat16),  # DeepSpeed's optimizer holds the fp32 partition
        ("lora", "NO", torch.bfloat16),  # frozen base; peft keeps the adapter in fp32
        ("lora", "FSDP", torch.bfloat16),
    ],
)
def test_weights_are_stored_as_the_precision_policy_says(method, engine, stored):
    placement = Placement(0, 0, 1, torch.device("cpu"), engine, False, False)
    method_config = config_of(f"method={method}").method
    assert weights_dtype(method_config, torch.bfloat16, placement) == stored
    assert weights_dtype(method_config, torch.float32, placement) == torch.float32  # CPU: fp32 throughout


# QLoRA's sharded quantization against from_pretrained's (one process) is test_reward's and
# test_tied_embeddings' on tiny models; here the two sharded loaders against each other
RUNS = ("ddp:lora", "fsdp:lora", "zero3:lora", "fsdp:qlora", "zero3:qlora")


@pytest.fixture(scope="module")
def load_memory(tmp_path_factory):
    """bench/load_memory.py's measurement: one 2.6 GiB checkpoint, loaded by 2 processes per launch and
    method, each run one step (the bench's second step adds nothing the tests read: ~4 s a run)."""
    sys.path.insert(0, str(REPO / "bench"))
    import load_memory

    work = tmp_path_factory.mktemp("load-memory")
    checkpoint = work / "checkpoint"
    checkpoint.mkdir()
    size = load_memory.build_checkpoint(checkpoint)
    return size, {name: load_memory.measure(name, checkpoint, work, steps=1) for name in RUNS}


@pytest.mark.slow
def test_a_checkpoint_is_read_once_per_node_under_fsdp_and_zero3(load_memory):
    """At step 0 rank 1 of a DDP launch holds a whole copy of the weights; under FSDP it holds its half,
    received from rank 0's broadcast, and under ZeRO-3 its partition, cut while rank 0 read; neither maps
    the checkpoint. While loading, an FSDP rank also holds one whole tensor at a time (the 0.49 GiB LM head
    here), DDP's about two copies; ZeRO-3's rank 1 peaks higher than FSDP's (zero.Init's construction and
    gathers, freed heap kept until loading ends: 3.05 GiB anonymous in docs/benchmarks.md), yet under DDP's.
    Generous margins: this proves the ordering, bench/load_memory.py prints the figures."""
    size, runs = load_memory
    held = {name: run["held"][1] - run["before"][1] for name, run in runs.items() if name.endswith(":lora")}
    loading = {
        name: run["load"][1] - run["before"][1] for name, run in runs.items() if name.endswith(":lora")
    }
    assert held["ddp:lora"] > 0.9 * size, held
    for sharded in ("fsdp:lora", "zero3:lora"):
        assert held[sharded] < 0.7 * size, (sharded, held)
        assert runs[sharded]["checkpoint_pages"][1] < 0.1 * size, runs[sharded]["checkpoint_pages"]
    assert loading["fsdp:lora"] < loading["ddp:lora"] - 0.4 * size, loading
    assert loading["zero3:lora"] < loading["ddp:lora"], loading
    assert "checkpoint read by local rank 0, broadcast to the others (FSDP)" in runs["fsdp:lora"]["log"]
    assert "weights partitioned while read (DeepSpeed ZeRO-3 zero.Init)" in runs["zero3:lora"]["log"]
    assert "every process reads the checkpoint" in runs["ddp:lora"]["log"]


def planned_load(launch: str, processes: int) -> int:
    """The planner's loading peak for one process of the measured QLoRA run (fp32 on this CPU)."""
    sys.path.insert(0, str(REPO / "bench"))
    import load_memory

    from train.plan.device import Device
    from train.plan.fit import plan_run

    config = config_of("method=qlora", f"launch={launch}", f"launch.num_processes={processes}",
                       *load_memory.ARCHITECTURE, "model.dtype=float32")  # fmt: skip
    return plan_run(config, Device.local()).load_bytes_per_gpu


@pytest.mark.slow
def test_qlora_is_read_and_quantized_once_and_each_rank_keeps_its_shard(load_memory):
    """train/model/quantized_loading.py under FSDP and ZeRO-3, 2 processes on a 2.6 GiB checkpoint: rank 1
    maps none of the checkpoint while loading (rank 0 reads it, one tensor at a time); no rank's anonymous
    memory grows by more than its shard of the quantized model and two whole tensors in flight, which is the
    planner's loading peak for this run, within 20%; and the first step's loss is the same under both
    (FSDP's DTensor shards and ZeRO-3's partitions of the same quantization, the same LoRA)."""
    size, runs = load_memory
    fsdp_loss, zero3_loss = runs["fsdp:qlora"]["losses"], runs["zero3:qlora"]["losses"]
    assert list(fsdp_loss) == list(zero3_loss) == [1]
    assert zero3_loss[1] == pytest.approx(fsdp_loss[1], rel=1e-5)
    for name, launch in (("fsdp:qlora", "fsdp"), ("zero3:qlora", "zero3")):
        run = runs[name]
        assert run["checkpoint_pages"][1] < 0.1 * size, (name, run["checkpoint_pages"])
        assert run["checkpoint_pages"][0] > 0.9 * size, (name, run["checkpoint_pages"])  # rank 0 read it all
        planned = planned_load(launch, 2)
        added = {rank: run["anon_load"][rank] - run["anon_before"][rank] for rank in (0, 1)}
        assert max(added.values()) == pytest.approx(planned, rel=0.2), (name, added, planned)
    assert "read and quantized by rank 0, one tensor at a time" in runs["fsdp:qlora"]["log"]
    # partitioned by zero.Init before deepspeed.initialize, which would otherwise move the whole model to
    # every GPU first (a no-op on this CPU, so only the count shows it): 2 norms + 7 Linears a layer, 3 more
    assert "QLoRA under ZeRO-3 (291 parameters partitioned now)" in runs["zero3:qlora"]["log"]


ACCELERATE_FSDP = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true"}


def test_a_run_started_by_accelerate_launch_takes_its_launch_when_none_was_chosen():
    from train.run.launch_env import launch_from_environment

    local = config_of().launch
    assert launch_from_environment(local, explicit=False, environ={}) is local  # python -m train: as is
    taken = launch_from_environment(local, explicit=False, environ=ACCELERATE_FSDP)
    assert (taken.name, taken.strategy, taken.num_processes, taken.num_machines) == (
        "accelerate",
        "fsdp",
        8,
        2,
    )
    zero3 = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
             "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}  # fmt: skip
    assert launch_from_environment(local, explicit=False, environ=zero3).strategy == "zero3_offload"
    ddp = launch_from_environment(local, explicit=False, environ={"WORLD_SIZE": "4"})
    assert (ddp.strategy, ddp.num_processes, ddp.num_machines) == ("ddp", 4, 1)


def test_an_explicit_launch_that_contradicts_the_launcher_is_refused_before_loading():
    from train.run.launch_env import launch_from_environment

    fsdp = config_of("launch=fsdp", "launch.num_processes=8", "launch.num_machines=2").launch
    assert launch_from_environment(fsdp, explicit=True, environ=ACCELERATE_FSDP) is fsdp  # they agree
    ddp = config_of("launch=ddp", "launch.num_processes=8").launch
    with pytest.raises(ConfigError) as error:
        launch_from_environment(ddp, explicit=True, environ=ACCELERATE_FSDP)
    assert str(error.value).startswith(
        "launch=ddp asks for 8 process(es) with ddp, but the launcher started 16 process(es) on 2 machine(s) "
        "with fsdp"
    )
    assert "drop launch= to train with the launcher's settings" in str(error.value)
