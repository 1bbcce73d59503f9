"""A target that leaves cores to the generator (a vLLM-CPU server or model process it pinned elsewhere)
gets the run's loop pinned there for the run, and the process's cores back after it (a capacity search
runs many steps in one process). Truth: the affinity the kernel reports, read from inside the run."""

from __future__ import annotations

import os

import pytest

from replay.core.request import Request, RequestRecord
from replay.run.config import RunConfig
from replay.run.runner import execute, run_in_uvloop
from replay.stub.server import StubProcess
from replay.targets.http_config import HTTPTargetConfig
from replay.targets.openai_http import OpenAIHTTPTarget


class LeavesCore0(OpenAIHTTPTarget):
    generator_cores = [0]
    seen: set[int] = set()

    async def send(self, request: Request, record: RequestRecord) -> None:
        self.seen |= os.sched_getaffinity(0)
        await super().send(request, record)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to one")
def test_the_generator_runs_on_the_cores_left_and_gets_its_own_back(tmp_path) -> None:
    before = os.sched_getaffinity(0)
    with StubProcess(["--ttft-ms", "5", "--itl-ms", "1"]) as stub:
        cfg = RunConfig(target=stub.base_url, rate=50.0, duration_s=0.4, output_tokens=4, input_tokens=8,
                        quiet=True)  # fmt: skip
        target = LeavesCore0(HTTPTargetConfig(base_url=stub.base_url))
        target.seen = set()
        schedule = [Request(id=i, intended_s=i / 50, input_tokens=8, output_tokens=4,
                            prompt_token_ids=list(range(100, 108))) for i in range(20)]  # fmt: skip
        res = run_in_uvloop(execute(cfg, target, schedule, tmp_path / "run", 50.0))
    assert target.seen == {0}
    assert res.summary["selfcheck"]["generator_cores"] == [0]
    assert os.sched_getaffinity(0) == before
