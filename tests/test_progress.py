"""Per-pair progress lines and the refinement's per-step lines."""

from __future__ import annotations

import io

import torch
from ignite.engine import Engine

from bundle.engines import InstanceOptimisationInferer, PairProgressHandler
from bundle.losses import RegistrationLoss


def test_one_line_per_pair_then_the_output_folder(tmp_path):
    batches = [[{"name": "a_to_b"}, {"name": "b_to_a"}], [{"name": "c_to_d"}]]
    engine = Engine(lambda engine, batch: batch)
    stream = io.StringIO()
    PairProgressHandler(output_dir=tmp_path, stream=stream).attach(engine)
    engine.run(batches)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["pair 1 a_to_b", "pair 2 b_to_a", "pair 3 c_to_d"]  # a list: total unknown
    assert lines[0].endswith(f" s -> {tmp_path.resolve() / 'a_to_b'}")  # each pair's folder
    assert lines[3] == f"3 pair(s) done; outputs in {tmp_path.resolve()}"
    assert len(lines) == 4


def test_names_come_from_the_batch_when_the_outputs_drop_them():
    engine = Engine(lambda engine, batch: [{"pred": 0}])  # post-processing kept no name
    stream = io.StringIO()
    PairProgressHandler(stream=stream).attach(engine)
    engine.run([{"name": ["x_to_y"]}])
    assert stream.getvalue().startswith("pair 1 x_to_y: ")


def test_the_total_comes_from_the_data_loader(tmp_path):
    loader = torch.utils.data.DataLoader([{"name": f"p{i}"} for i in range(3)], batch_size=1,
                                         collate_fn=lambda items: items)
    engine = Engine(lambda engine, batch: batch)
    stream = io.StringIO()
    PairProgressHandler(what="image", stream=stream).attach(engine)
    engine.run(loader)
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["image 1/3 p0", "image 2/3 p1", "image 3/3 p2"]  # no folder line


def test_refinement_prints_its_progress(capsys):
    torch.manual_seed(0)
    moving, fixed = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    inferer = InstanceOptimisationInferer(RegistrationLoss(), steps=8, progress_every=4)
    inferer(torch.cat([moving, fixed], 1), lambda x: torch.zeros(1, 3, 8, 8, 8))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refinement step 4/8", "refinement step 8/8"]
    losses = [float(line.split("loss ")[1]) for line in lines]
    assert losses[1] < losses[0]  # the lines report the loss being minimised
    InstanceOptimisationInferer(RegistrationLoss(), steps=3)(torch.cat([moving, fixed], 1), lambda x: torch.zeros(1, 3, 8, 8, 8))
    assert capsys.readouterr().out == ""  # silent by default
