"""`srun python main_dino.py` without torchrun: SLURM's task variables become one process group (the 2-process run
is in test_train_distributed.py), or one line says what to set; a launcher's own variables always win."""
from __future__ import annotations

import pytest
from test_train import TINY

import main_dino
from sparo_dino import distributed
from sparo_dino.distributed import LaunchError, parse_node_list, srun_environment

TASK_1_OF_2 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77"}
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("node_list, hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu-a[1-2],gpu-b5", ["gpu-a1", "gpu-a2", "gpu-b5"]),
    ("n[001-002]x", ["n001x", "n002x"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("r[1-2]-n[09-10]", ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]),
    ("a1,b[3,1],c.lab.org", ["a1", "b3", "b1", "c.lab.org"]),
])
def test_node_lists_expand_in_order_with_their_zero_padding(node_list, hosts) -> None:
    assert parse_node_list(node_list) == hosts


@pytest.mark.parametrize("node_list", ["", "node[01-03", "node]1[", "node[3-1]", "node[a-b]", "node[]", "a,,b"])
def test_a_node_list_not_in_slurm_form_is_one_line_naming_it(node_list) -> None:
    with pytest.raises(LaunchError, match="SLURM node list") as error:
        parse_node_list(node_list)
    assert "\n" not in str(error.value) and "MASTER_ADDR" in str(error.value)


def test_srun_tasks_get_torchrun_variables_with_the_first_host_and_the_default_port() -> None:
    env = {**TASK_1_OF_2, "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2"}
    assert srun_environment(env) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1",
                                     "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    # the step's own node list comes first; MASTER_ADDR and MASTER_PORT, where set, are kept
    env = {**TASK_1_OF_2, "SLURM_STEP_NODELIST": "gpu[08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "x"}
    assert srun_environment(env)["MASTER_ADDR"] == "gpu08"
    assert srun_environment({**TASK_1_OF_2, "SLURM_NODELIST": "cpu3"})["MASTER_ADDR"] == "cpu3"
    assert srun_environment({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})["MASTER_ADDR"] == "10.0.0.1"
    assert srun_environment({**env, "MASTER_PORT": "4000"})["MASTER_PORT"] == "4000"
    assert srun_environment({**TASK_1_OF_2, "MASTER_ADDR": "h", "SLURM_NTASKS": "8"})["LOCAL_WORLD_SIZE"] == "8"


def test_a_launcher_a_single_task_or_no_slurm_task_leave_the_environment_alone() -> None:
    """torchrun inside an sbatch allocation (SLURM_* and torchrun's RANK both set): torchrun's variables win."""
    assert srun_environment({**TASK_1_OF_2, "RANK": "3", "WORLD_SIZE": "8", "SLURM_JOB_NODELIST": "n1"}) == {}
    assert srun_environment({**TASK_1_OF_2, "RANK": "0"}) == {}  # even without a node list: no error
    assert srun_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) == {}
    assert srun_environment({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2"}) == {}  # a batch script's shell: no task
    assert srun_environment({}) == {}


def test_several_tasks_without_any_host_stop_with_one_line_saying_what_to_set() -> None:
    with pytest.raises(LaunchError) as error:
        srun_environment(TASK_1_OF_2)
    message = str(error.value)
    assert "\n" not in message and "2 tasks" in message and "export MASTER_ADDR=" in message


@pytest.fixture
def slurm_task(monkeypatch):
    """An srun task's environment in this process; the launcher variables that init_distributed may set are
    restored afterwards."""
    for name in LAUNCHER_VARIABLES + ("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)

    def start(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
    return start


def test_main_dino_under_srun_without_a_host_ends_with_that_line(slurm_task, tmp_path, capsys) -> None:
    """Today the two tasks would each train alone into the same output dir; now each ends with the one line."""
    slurm_task(**{**TASK_1_OF_2, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    code = main_dino.main([*TINY, "--dataset", "fashion_mnist", "--data_path", str(tmp_path / "none"),
                           "--output_dir", str(tmp_path / "out"), "--epochs", "1"])
    error = capsys.readouterr().err.strip()
    assert code == 1 and error.startswith("error: srun started 2 tasks") and "\n" not in error, error
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_a_single_srun_task_runs_alone(slurm_task) -> None:
    slurm_task(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0")
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, distributed.is_dist()) == (0, 1, False)
