"""One definition of the status file (daemon/schema.py): the writer, the monitor's model and the OpenAPI schema follow it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from daemon.schema import DistributedSetup, RankFigures, TrainingStatus, iso
from daemon.states import ServiceStatus
from daemon.status import StatusWriter, read_status
from monitor.models import Status, status_file_model

MONITOR_FIELDS = {"stale", "stale_reason", "stale_cause", "age_seconds", "daemon_alive", "requested_state", "pending_requests", "now"}


def test_every_field_has_a_help_text() -> None:
    for f in dataclasses.fields(TrainingStatus):
        assert len(f.metadata.get("help", "")) > 5, f.name


def test_writer_writes_exactly_the_schema_fields(tmp_path) -> None:
    StatusWriter(tmp_path).write(TrainingStatus(status=ServiceStatus.PAUSED, started_at=10.5, queue={"done": 2}), now=20.25)
    raw = read_status(tmp_path)
    assert list(raw) == [f.name for f in dataclasses.fields(TrainingStatus)]
    assert raw["status"] == "paused" and raw["desired_state"] == "running" and raw["schema_version"] == 1
    assert raw["started_at"] == iso(10.5) == "1970-01-01T00:00:10.500Z" and raw["updated_at"] == iso(20.25)
    assert raw["queue"] == {"done": 2}


def test_monitor_model_and_openapi_carry_every_schema_field_with_its_help() -> None:
    props = Status.model_json_schema()["properties"]
    schema_fields = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainingStatus)}
    assert set(props) == set(schema_fields) | MONITOR_FIELDS
    for name, help_text in schema_fields.items():
        assert props[name]["description"].startswith(help_text), name
    assert "one of idle, training, paused" in props["status"]["description"]


def test_a_written_status_reads_back_unchanged_through_the_monitor_model() -> None:
    body = json.loads(json.dumps(TrainingStatus(status=ServiceStatus.TRAINING, loss=1.25, started_at=3.0).to_dict()))
    read = Status.model_validate(dict(body, stale=False, requested_state="running", now=4.0)).model_dump()
    assert {k: read[k] for k in body} == body


def test_per_rank_figures_read_back_unchanged_and_typed() -> None:
    ranks = [RankFigures(rank=r, host="node-a", device=f"cuda:{r}", tokens=100, compute_seconds=0.5,
                         tokens_per_sec=200.0, rss_bytes=2**30, gpu_memory_bytes=2**31) for r in (0, 1)]
    st = TrainingStatus(world_size=2, distributed=DistributedSetup("fsdp", "nccl", 1), ranks=ranks, slowest_rank=0)
    body = json.loads(json.dumps(st.to_dict()))
    assert body["ranks"][1]["device"] == "cuda:1" and body["distributed"] == {"strategy": "fsdp", "backend": "nccl", "nnodes": 1}
    read = Status.model_validate(dict(body, stale=False, requested_state="running", now=4.0))
    assert {k: read.model_dump()[k] for k in body} == body
    assert read.ranks[1].gpu_memory_bytes == 2**31
    rank_schema = Status.model_json_schema()["$defs"]["RankFigures"]["properties"]
    assert set(rank_schema) == {f.name for f in dataclasses.fields(RankFigures)}


def test_no_status_file_reads_as_empty_values_and_null_claims() -> None:
    read = Status.model_validate({"stale": True, "requested_state": "running", "now": 0.0}).model_dump()
    assert read["current_step"] == 0 and read["detail"] == "" and read["queue"] == {}
    assert read["status"] is None and read["desired_state"] is None and read["schema_version"] is None
    assert read["write_interval_seconds"] is None


def test_a_new_schema_field_reaches_the_monitor_model_without_touching_it() -> None:
    @dataclass
    class Newer(TrainingStatus):
        pipeline_stages: int = dataclasses.field(default=1, metadata={"help": "pipeline stages"})

    props = status_file_model(Newer).model_json_schema()["properties"]
    assert props["pipeline_stages"]["description"] == "pipeline stages"
