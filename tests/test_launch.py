"""Launching: the printed accelerate line, real 2-process DDP over gloo, and refusing the wrong engine."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import NO_EVAL, REPO, run_train
from safetensors.torch import load_file

from launch.__main__ import free_port, train_overrides

SHORT = [
    NO_EVAL,
    "training.max_steps=4",
    "training.report_to=[]",
    "method.lora_dropout=0.0",
    "training.logging_steps=1",
]
RESUME_LATEST = "training.resume_from_checkpoint=latest"
# the shared FSDP and ZeRO-3 runs (also read by test_state_bytes): checkpoints every 2 steps, and an eval set
# of its own (data.eval_path: the training rows stay DDP's), so evaluation is proven under FSDP and ZeRO-3
SHARDED_RUN = (
    "training.save_steps=2",
    f"data.eval_path={REPO / 'data' / 'samples' / 'oasst_top1_sample.jsonl'}",
    "data.eval_format=oasst_top1",
)


def launch(*overrides: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", *overrides], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_prints_the_accelerate_line(tmp_path):
    result = launch(
        "launch=ddp", "launch.num_processes=4", "launch.num_machines=2", "method=qlora", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    note, line = result.stdout.strip().splitlines()[-2:]
    config_file = REPO / "launch" / "accelerate" / "ddp.yaml"
    assert note == "# on each of the 2 machines, with MACHINE_RANK, MAIN_ADDR and MAIN_PORT set:"
    assert line.startswith(
        f"accelerate launch --config_file {config_file} --num_processes 8 --num_machines 2 "
        '--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" '
        "-m train launch=ddp launch.num_processes=4 launch.num_machines=2 method=qlora hydra.run.dir="
    )


@pytest.mark.slow
def test_single_process_accelerate_line_runs(tmp_path):
    run_dir = tmp_path / "run"
    two_steps = (*SHORT, "training.max_steps=2")
    result = launch("launch.run=true", f"hydra.run.dir={run_dir}", *two_steps, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"--config_file {REPO / 'launch' / 'accelerate' / 'single.yaml'} --num_processes 1 " in result.stdout
    )
    assert "launch=local: 1 process(es), engine NO, backend none" in result.stdout + result.stderr
    assert list(losses(run_dir)) == [1, 2]


@pytest.mark.slow
def test_two_machines_started_by_hand_train_as_one_run(ddp_run, tmp_path):
    """The multi-machine line, run on two "machines" of this host: they rendezvous and train like DDP."""
    run_dir, port = tmp_path / "run", str(free_port())
    overrides = ["launch=ddp", "launch.num_machines=2", "launch.num_processes=1", "launch.run=true",
                 f"hydra.run.dir={run_dir}", "training.per_device_train_batch_size=1", *SHORT]  # fmt: skip
    refused = launch(*overrides, cwd=tmp_path)
    assert (
        refused.returncode == 2 and "set MACHINE_RANK, MAIN_ADDR, MAIN_PORT on each machine" in refused.stderr
    )
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "launch", *overrides],
            env={**os.environ, "MACHINE_RANK": str(rank), "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": port},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert (
        "launch=ddp: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel" in logs[0]
    )
    expected = losses(ddp_run[0])
    for step, loss in losses(run_dir).items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step


@pytest.mark.slow
def test_accelerate_launch_by_hand_without_launch_takes_accelerates_settings(ddp_run, tmp_path):
    """A TRL user's habit: `accelerate launch --config_file <theirs> --num_processes 2 -m train ...` and no
    launch=: the run takes 2-process DDP from accelerate's environment (train/run/launch_env.py) and trains as
    launch=ddp does. An explicit launch= that contradicts the launcher stops before any weight loads."""

    def accelerate(config: str, *overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "launch" / "accelerate" / config), "--num_processes", "2", "-m", "train",
                   "training.per_device_train_batch_size=1", *SHORT, *overrides]  # fmt: skip
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    result = accelerate("ddp.yaml", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert (
        "launch=accelerate: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel"
        in log
    )
    expected = losses(ddp_run[0])
    for step, loss in losses(tmp_path / "run").items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step
    refused = accelerate(
        "fsdp.yaml", "launch=ddp", "launch.num_processes=2", f"hydra.run.dir={tmp_path / 'no'}"
    )
    assert refused.returncode != 0
    assert (
        "launch=ddp asks for 2 process(es) with ddp, but the launcher started 2 process(es) on 1 machine(s) "
        "with fsdp" in refused.stderr
    )
    assert "placement:" not in refused.stdout + refused.stderr  # refused before processes were placed


@pytest.mark.parametrize("name", ["fsdp", "zero3_offload"])
def test_sharded_launches_print_their_accelerate_config(tmp_path, name):
    result = launch(f"launch={name}", "launch.num_processes=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config_file = REPO / "launch" / "accelerate" / f"{name}.yaml"
    assert (
        f"accelerate launch --config_file {config_file} --num_processes 2 --num_machines 1 " in result.stdout
    )


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "ddp", "fsdp"])
def test_every_launch_across_machines_runs_one_torchrun_per_machine(name):
    """DeepSpeed too: accelerate, given python -m launch's arguments for machine 1 of 2 (as the sbatch script
    and MACHINE_RANK/MAIN_ADDR pass them), prepares torchrun's (2 nodes, node rank 1, machine 0's address),
    not DeepSpeed's pdsh runner (`deepspeed --hostfile None`: FileNotFoundError under Slurm). The same from
    our yaml alone, for `accelerate launch --config_file launch/accelerate/zero3.yaml` by hand."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import _filter_args, prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from launch.__main__ import process_arguments
    from train.config import compose_config, load_config

    overrides = [f"launch={name}", "launch.num_machines=2", "launch.num_processes=2"]
    arguments = process_arguments(load_config(compose_config(overrides)))
    deepspeed = name.startswith("zero")
    launcher = ["--deepspeed_multinode_launcher", "standard"]
    assert (arguments[-2:] == launcher) == deepspeed  # shown in the printed line and the sbatch script
    rendezvous = ["--machine_rank", "1", "--main_process_ip", "10.0.0.7", "--main_process_port", "29555"]
    for given in (arguments, arguments[:-2]) if deepspeed else (arguments,):
        parsed = launch_command_parser().parse_args([*given, *rendezvous, "-m", "train"])
        args, _, _ = _validate_launch_command(parsed)
        assert args.use_deepspeed == deepspeed
        if deepspeed:  # a command is DeepSpeed's runner, None torchrun (accelerate/commands/launch.py:1060)
            args.deepspeed_fields_from_accelerate_config = ""  # launch_command's (commands/launch.py:1394)
            assert prepare_deepspeed_cmd_env(args)[0] is None
        else:
            prepare_multi_gpu_env(args)
        # torchrun's arguments, as accelerate gives them to torch.distributed.run (commands/launch.py:1075)
        run = _filter_args(args, torchrun.get_args_parser(), ["--training_script", "train"])
        assert (run.nnodes, run.node_rank, run.nproc_per_node, run.rdzv_backend) == ("2", 1, "2", "static")
        assert torchrun.get_rdzv_endpoint(run) == "10.0.0.7:29555"


def test_a_launch_started_without_its_processes_is_refused(tmp_path):
    result = run_train("launch=ddp", "launch.num_processes=2", *SHORT, f"hydra.run.dir={tmp_path / 'run'}",
                       cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "error: launch=ddp asks for 2 process(es) with ddp, but this process was started alone (no WORLD_SIZE"
        in result.stderr
    )
    assert "`python -m launch launch=ddp launch.run=true ...`" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # before anything loads


def losses(run_dir, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def eval_losses(run_dir) -> dict[int, float]:
    """The held-out eval loss by step (data.eval_split)."""
    return losses(run_dir, "eval_loss")


def launched(tmp_path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, str]:
    run_dir = tmp_path / name
    result = launch(
        f"launch={name}", "launch.num_processes=2", "launch.run=true", f"hydra.run.dir={run_dir}",
        "training.per_device_train_batch_size=1", *SHORT, *overrides, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result.stdout + result.stderr  # Hydra logs to stdout


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launched(tmp_path_factory.mktemp("launch"), "ddp")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_twice_the_batch(ddp_run, tmp_path):
    ddp_dir, log = ddp_run
    assert "launch=ddp: 2 process(es), engine MULTI_CPU, backend gloo, model DistributedDataParallel" in log
    # DDP did not search the graph for unused parameters (train/run/trainer.py training_args): where it does
    # and finds none, torch warns after the first backward (reducer.cpp), as it did here for every LoRA run
    assert "find_unused_parameters=True was specified in DDP constructor" not in log
    single = run_train(
        f"hydra.run.dir={tmp_path / 'single'}", "training.per_device_train_batch_size=2", *SHORT, cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-4000:]
    assert "launch=local: 1 process(es), engine NO, backend none" in single.stdout + single.stderr
    ddp_weights = load_file(ddp_dir / "adapter" / "adapter_model.safetensors")
    single_weights = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert ddp_weights.keys() == single_weights.keys()
    moved = 0
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, atol=2e-5, rtol=1e-4)
        moved += "lora_B" in name and tensor.abs().sum() > 0
    assert moved  # the adapters trained: equal because they learned the same, not because neither moved


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_zero_trains_like_ddp(ddp_run, shared_launch, stage):
    """DeepSpeed runs on CPU here (gloo, its own CPU accelerator); the first use JIT-builds its comm op,
    and offload's first use its CPU Adam (~90 s each, cached under ~/.cache/torch_extensions)."""
    # zero3's run (its checkpoints too) is also read by test_zero3_checkpoint_resumes and test_state_bytes;
    # offload's steps are the slowest here (DeepSpeedCPUAdam, parameters fetched from host memory): 2 of them
    extra = {"zero3": SHARDED_RUN, "zero3_offload": ("training.max_steps=2",)}.get(stage, ())
    run_dir, log = shared_launch(stage, *extra)
    zero, offload = stage.split("_offload")[0][-1], "cpu" if stage.endswith("offload") else "none"
    assert (
        f"launch={stage}: 2 process(es), engine DEEPSPEED, backend gloo, model DeepSpeedEngine, "
        f"ZeRO-{zero}, offload optimizer {offload}, parameters {offload}" in log
    )
    steps = 2 if stage == "zero3_offload" else 4
    expected = {step: loss for step, loss in losses(ddp_run[0]).items() if step <= steps}
    assert list(losses(run_dir)) == list(expected) == list(range(1, steps + 1))
    # zero3's shared run evaluates on an eval file of its own (SHARDED_RUN), at the end, under ZeRO-3
    assert list(eval_losses(run_dir)) == ([4] if stage == "zero3" else [])
    for step, loss in losses(run_dir).items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_zero3_checkpoint_resumes_where_it_stopped(shared_launch, tmp_path):
    """Sharded ZeRO-3 checkpoints (every rank its partition of the weights and optimizer states): resuming
    from step 2 of 4 in a fresh run directory reproduces steps 3 and 4 exactly, and the held-out eval loss
    at the end. (A checkpoint killed while it was written, in every way, is test_faults.py's.)"""
    run_dir, _ = shared_launch("zero3", *SHARDED_RUN)
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    states = sorted(path.name for path in (checkpoint / "global_step2").glob("*_optim_states.pt"))
    assert states == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]  # one per rank
    (tmp_path / "resumed").mkdir()
    resumed_dir, log = launched(
        tmp_path / "resumed",
        "zero3",
        *SHARDED_RUN,
        f"training.resume_from_checkpoint={checkpoint}",
    )
    assert f"resuming from {checkpoint}\n" in log
    resumed, uninterrupted = losses(resumed_dir), losses(run_dir)
    assert list(resumed) == [3, 4]  # it went on from step 2, not from the start
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
    assert eval_losses(resumed_dir) == pytest.approx(eval_losses(run_dir), abs=1e-5)  # {4: ...}, under ZeRO-3
    assert list(eval_losses(resumed_dir)) == [4]


@pytest.fixture(scope="module")
def fsdp_run(shared_launch):
    return shared_launch("fsdp", *SHARDED_RUN)  # also read by test_state_bytes


@pytest.mark.slow
def test_fsdp_shards_on_cpu_and_trains_like_ddp(ddp_run, fsdp_run, tokenizer):
    """accelerate alone would train DDP here (train/run/trainer.py shard_with_fsdp_on_cpu); the final
    save gathers every rank's shards, so adapter/ is DDP's adapter, whole, and loads with peft."""
    from peft import PeftModel

    from train.model.build import build_model
    from train.run.run_dir import run_config

    run_dir, log = fsdp_run
    # 37 parameters: 2 layers x (4 attention + 8 LoRA + 3 MLP + 2 norms), embeddings, final norm, LM head
    assert (
        "launch=fsdp: 2 process(es), engine FSDP, backend gloo, model FSDPPeftModelForCausalLM, "
        "37/37 parameters DTensor shards, rank 0 holds 50%" in log
    )
    expected = losses(ddp_run[0])
    assert list(losses(run_dir)) == list(expected) == [1, 2, 3, 4]
    assert list(eval_losses(run_dir)) == [4]  # data.eval_path (SHARDED_RUN), evaluated under FSDP at the end
    for step, loss in losses(run_dir).items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    ddp_adapter = load_file(ddp_run[0] / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == ddp_adapter.keys() and len(adapter) == 16  # 2 layers x q,k,v,o x A,B
    for name, tensor in ddp_adapter.items():
        torch.testing.assert_close(adapter[name], tensor, atol=2e-5, rtol=1e-4)
    config = run_config(run_dir)
    base = build_model(config.model, tokenizer, dtype=torch.float32, seed=config.training.seed)
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    loaded = {name: p for name, p in tuned.named_parameters() if "lora_B" in name}
    assert len(loaded) == 8 and all(p.abs().sum() > 0 for p in loaded.values())  # trained, and loaded


@pytest.mark.slow
def test_fsdp_checkpoint_is_sharded_and_resumes_where_it_stopped(fsdp_run, tmp_path):
    """Each rank writes its own shards (torch.distributed.checkpoint); resuming from step 2 of 4
    in a fresh run directory reproduces steps 3 and 4 exactly."""
    from torch.distributed.checkpoint import FileSystemReader

    run_dir, _ = fsdp_run
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    shards = checkpoint / "pytorch_model_fsdp_0"
    assert sorted(path.name for path in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = FileSystemReader(shards).read_metadata().state_dict_metadata
    assert sum("lora_B" in key for key in saved) == 8  # the adapter is in it, not an empty file set
    assert not list(checkpoint.glob("*.safetensors"))  # sharded, not gathered
    (tmp_path / "resumed").mkdir()
    resumed_dir, _ = launched(
        tmp_path / "resumed", "fsdp", "training.save_steps=2", f"training.resume_from_checkpoint={checkpoint}"
    )
    resumed, uninterrupted = losses(resumed_dir), losses(run_dir)
    assert list(resumed) == [3, 4]  # it went on from step 2, not from the start
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.slow
def test_qlora_under_fsdp_shards_its_4bit_weights_and_resumes(tmp_path):
    """4-bit weights stored in the compute dtype (train/model/build.py) are sharded like every other
    parameter, quantized into each rank's shard at step 0 (train/model/quantized_loading.py); a run resumed
    from a checkpoint, whose skeleton is filled again after the checkpoint is read, repeats the same
    losses."""
    run_dir, log = launched(tmp_path, "fsdp", "method=qlora", "training.save_steps=2")
    assert "launch=fsdp: 2 process(es), engine FSDP, backend gloo, model FSDPPeftModelForCausalLM, " in log
    assert "37/37 parameters DTensor shards" in log
    assert "read and quantized by rank 0, one tensor at a time; each rank keeps its shard (21 tensors)" in log
    assert len(load_file(run_dir / "adapter" / "adapter_model.safetensors")) == 16  # 2 layers x q/k/v/o x A/B
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    (tmp_path / "resumed").mkdir()
    resumed_dir, _ = launched(tmp_path / "resumed", "fsdp", "method=qlora", "training.save_steps=2",
                              f"training.resume_from_checkpoint={checkpoint}")  # fmt: skip
    resumed, uninterrupted = losses(resumed_dir), losses(run_dir)
    assert list(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


@pytest.mark.slow
def test_full_dpo_under_fsdp_scores_rank_0s_reference_on_every_rank(tmp_path):
    """Under FSDP's rank-0 loading rank 1 builds the reference as shapes only; it must still score with rank
    0's weights (train/run/preference.py reference_from_rank_zero): at step 1 policy == reference on every
    rank, so the loss is exactly log 2. A reference left uninitialised on rank 1 would move it."""
    run_dir, log = launched(
        tmp_path, "fsdp", "stage=dpo", "data=preference_sample", "method=full", "training.max_steps=1"
    )
    assert "checkpoint read by local rank 0, broadcast to the others (FSDP)" in log
    assert "launch=fsdp: 2 process(es), engine FSDP, backend gloo, model FSDPLlamaForCausalLM" in log
    assert losses(run_dir)[1] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_full_dpo_under_zero3_reads_its_reference_partitioned(tmp_path, tokenizer):
    """With model.path under ZeRO-3 the policy is partitioned while read (zero.Init), and so is the
    reference (train/run/preference.py reference_copy): step 1 scores policy == reference, loss log 2."""
    from test_config import composed

    from train.config import load_config
    from train.model.build import build_model

    checkpoint = tmp_path / "checkpoint"
    config = load_config(composed())
    build_model(config.model, tokenizer, dtype=torch.float32, seed=0).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    run_dir, log = launched(
        tmp_path, "zero3", "stage=dpo", "data=preference_sample", "method=full", f"model.path={checkpoint}",
        "training.max_steps=1",
    )  # fmt: skip
    assert "weights partitioned while read (DeepSpeed ZeRO-3 zero.Init)" in log
    assert "37/37 parameters partitioned" not in log  # full: 21 parameters, every one partitioned
    assert "ZeRO-3, offload optimizer none, parameters none, 21/21 parameters partitioned" in log
    assert losses(run_dir)[1] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_lora_dpo_runs_sharded_under_fsdp(tmp_path):
    """Every stage's trainer gets the same launches (FSDP on CPU through train/run/trainer.py ShardedOnCpu);
    FSDP is the one that rewraps the model. (DPO under ZeRO-3:
    test_full_dpo_under_zero3_reads_its_reference.)"""
    run_dir, log = launched(tmp_path, "fsdp", "stage=dpo", "data=preference_sample", "training.max_steps=2")
    engine = "engine FSDP, backend gloo, model FSDPPeftModelForCausalLM, 37/37 parameters DTensor shards"
    assert f"launch=fsdp: 2 process(es), {engine}" in log
    assert len(load_file(run_dir / "adapter" / "adapter_model.safetensors")) == 16
    steps = losses(run_dir)
    assert list(steps) == [1, 2] and steps[1] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference


def test_every_launch_resumes_its_run_directory_unless_told_otherwise(tmp_path):
    run_dir, overrides = train_overrides(["launch=ddp", "launch.run=true", f"hydra.run.dir={tmp_path}"])
    assert (run_dir, overrides) == (tmp_path, ["launch=ddp", f"hydra.run.dir={tmp_path}", RESUME_LATEST])
    _, overrides = train_overrides(["training.resume_from_checkpoint=null"])
    assert overrides[0] == "training.resume_from_checkpoint=null" and RESUME_LATEST not in overrides


def test_launching_imports_neither_torch_nor_transformers():
    """`python -m launch` renders and submits at once: train.run.run_dir, not train.run.checkpoints (7 s, 400
    MB)."""
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, launch.__main__, launch.slurm; print(*sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    assert not {"torch", "transformers", "trl", "peft", "train.export"} & set(imported)


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_same_command_resumes_step_for_step(ddp_run, tmp_path):
    """SIGTERM to the launcher's process group mid-run, as `kill -- -<pgid>` or a scheduler sends it:
    torchrun passes it on, every rank stops after the same step with a complete checkpoint, and the
    same command goes on from it, with the losses of the DDP run that was never stopped, step for step,
    each logged once. (With dropout on, so that every rank's RNG must come back too: the Slurm jobs of
    test_slurm_launch.py, stopped by preemption, a time limit and a lost node.)"""
    reference = ddp_run[0]  # 4 steps, never stopped
    only_the_stop = ["training.save_steps=100"]  # no periodic checkpoint: the stop writes the one
    run_dir = tmp_path / "stopped"
    command = [
        sys.executable, "-m", "launch", "launch=ddp", "launch.num_processes=2", "launch.run=true",
        f"hydra.run.dir={run_dir}", "training.per_device_train_batch_size=1", *SHORT, *only_the_stop,
    ]  # fmt: skip
    log = tmp_path / "stopped.log"
    with log.open("w") as file:
        launcher = subprocess.Popen(command, cwd=tmp_path, stdout=file, stderr=file, start_new_session=True)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().strip()):  # step 1 is logged
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=300)
    output = log.read_text()
    step = int((run_dir / "stopped").read_text().split()[0])
    assert 2 <= step < 4, output[-4000:]
    assert (run_dir / "stopped").read_text() == f"{step} SIGTERM\n"
    assert f"stop requested (SIGTERM): checkpoint at step {step}, then stop" in output
    assert f"stopped (SIGTERM) with checkpoint-{step} complete; the same command goes on from it" in output
    assert (run_dir / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").is_file()
    assert list(losses(run_dir)) == list(range(1, step + 1))

    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{step}'}\n" in resumed.stdout
    assert not (run_dir / "stopped").exists() and not (run_dir / "checkpoint-and-stop").exists()
    assert losses(run_dir) == pytest.approx(losses(reference), abs=1e-6)  # steps 1-4, each once
