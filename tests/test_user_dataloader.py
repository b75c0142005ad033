"""Through the Python API, dtrain keeps what the user's DataLoader says (order, drop_last, workers, eval batch
size, a sampler with state) and refuses, with one clear error, a sampler whose position it cannot save."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from conftest import REPO
from dtrain import Config, Trainer
from dtrain.errors import UsageError


class Recording(Dataset):
    """n samples (x, y); remembers every index read, in order (and in a file when read by workers)."""

    def __init__(self, n: int, log_file=None):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.read: list[int] = []
        self.log_file = log_file

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(i)
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{os.getpid()} {i}\n")
        return self.x[i], self.y[i]


class ReversedSampler(Sampler):
    """A user's sampler that keeps its own position: the indices backwards, rotated by the epoch."""

    def __init__(self, n: int):
        self.n, self.epoch, self.position = n, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = list(reversed(range(self.n)))
        shift = self.epoch % self.n
        order = order[shift:] + order[:shift]
        while self.position < self.n:
            self.position += 1
            yield order[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class PlainSampler(Sampler):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))


def loss_fn(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def make_trainer(out, train_dataloader, max_steps: int = 0, epochs: int = 0, resume: str = "none",
                 save_every_steps: int = 0, eval_dataloader=None) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    config = Config(output_dir=str(out))
    config.train.max_steps, config.train.epochs, config.train.warmup_steps = max_steps, epochs, 2
    config.eval.log_every_steps, config.eval.eval_every_steps = 1000, 0
    config.checkpoint.resume, config.checkpoint.save_every_steps = resume, save_every_steps
    config.checkpoint.keep_last = 0
    return Trainer(config, model=model, loss_fn=loss_fn, train_dataloader=train_dataloader,
                   eval_dataloader=eval_dataloader)


def weights(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_shuffle_false_trains_in_sequential_order_and_resumes_there(tmp_path, fresh_accelerate_state):
    data = Recording(40)
    make_trainer(tmp_path / "run", DataLoader(data, batch_size=4, shuffle=False), max_steps=6,
                 save_every_steps=3).fit()
    assert data.read == list(range(24))
    from conftest import reset_accelerate

    reset_accelerate()
    again = Recording(40)
    make_trainer(tmp_path / "run", DataLoader(again, batch_size=4, shuffle=False), max_steps=6,
                 resume=str(tmp_path / "run" / "checkpoints" / "step_000000003")).fit()
    assert again.read == list(range(12, 24)), "the resumed run continues the sequential order"


def test_shuffle_true_keeps_dtrains_seeded_order(tmp_path, fresh_accelerate_state):
    data = Recording(40)
    make_trainer(tmp_path / "run", DataLoader(data, batch_size=4, shuffle=True), max_steps=10).fit()
    assert sorted(data.read) == list(range(40)) and data.read != list(range(40))


@pytest.mark.parametrize("drop_last, steps", [(True, 2), (False, 3)])
def test_drop_last_is_honoured(tmp_path, fresh_accelerate_state, drop_last, steps):
    data = Recording(10)
    trainer = make_trainer(tmp_path / "run", DataLoader(data, batch_size=4, shuffle=False, drop_last=drop_last),
                           epochs=1)
    result = trainer.fit()
    assert result.global_step == steps
    assert data.read == list(range(8 if drop_last else 10))


def test_num_workers_and_eval_batch_size_are_honoured(tmp_path, fresh_accelerate_state):
    log = tmp_path / "reads.txt"
    data = Recording(64, log_file=log)
    trainer = make_trainer(tmp_path / "run", DataLoader(data, batch_size=4, num_workers=2, pin_memory=True),
                           max_steps=4, eval_dataloader=DataLoader(Recording(20), batch_size=5))
    assert trainer.train_data.num_workers == 2 and trainer.train_data.pin_memory is True
    assert [len(batch[0]) for batch in trainer.evaluator.loader] == [5, 5, 5, 5]
    trainer.fit()
    pids = {int(line.split()[0]) for line in log.read_text().splitlines()}
    assert pids and os.getpid() not in pids, "samples were read in worker processes"


def test_a_sampler_without_state_is_refused_with_a_clear_error(tmp_path, fresh_accelerate_state):
    loader = DataLoader(Recording(40), batch_size=4, sampler=PlainSampler(40))
    with pytest.raises(UsageError) as error:
        make_trainer(tmp_path / "run", loader, max_steps=4)
    message = str(error.value)
    assert "PlainSampler" in message and "state_dict()" in message and "load_state_dict" in message
    assert error.value.exit_code == 2
    assert not (tmp_path / "run").exists(), "nothing was written"


def test_a_sampler_without_state_exits_2_with_one_error_line(runner, tmp_path):
    script = tmp_path / "train_api.py"
    script.write_text(
        "import sys, torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from dtrain import Config, Trainer\n"
        "from dtrain.commands.common import run_main\n"
        "class Backwards(torch.utils.data.Sampler):\n"
        "    def __len__(self): return 8\n"
        "    def __iter__(self): return iter(range(7, -1, -1))\n"
        "data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))\n"
        "loader = DataLoader(data, batch_size=2, sampler=Backwards())\n"
        "sys.exit(run_main(lambda: Trainer(Config(output_dir=sys.argv[1]), model=torch.nn.Linear(2, 1),\n"
        "    loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), train_dataloader=loader).fit()))\n")
    result = runner.run([sys.executable, str(script), str(tmp_path / "run")], cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Backwards" in errors[0] and "state_dict()" in errors[0]
    assert "Traceback" not in result.stdout


def test_a_sampler_with_state_is_used_and_resumes_exactly(tmp_path, fresh_accelerate_state):
    from conftest import reset_accelerate

    data = Recording(24)
    straight = make_trainer(tmp_path / "straight", DataLoader(data, batch_size=4, sampler=ReversedSampler(24)),
                            max_steps=10, save_every_steps=4)
    assert straight.train_data.steps_per_epoch == 6
    straight.fit()
    assert data.read[:24] == list(range(23, -1, -1)), "the user's sampler decides the order"
    assert data.read[24:28] == [22, 21, 20, 19], "and gets set_epoch"
    expected = weights(straight)

    reset_accelerate()
    again = Recording(24)
    resumed = make_trainer(tmp_path / "straight", DataLoader(again, batch_size=4, sampler=ReversedSampler(24)),
                           max_steps=10, resume=str(tmp_path / "straight" / "checkpoints" / "step_000000004"))
    resumed.fit()
    assert again.read == data.read[16:], "resumed where the sampler was"
    result = weights(resumed)
    assert all(torch.equal(expected[k], result[k]) for k in expected)
