"""The adapter's lineage, as the trainer (the store's one writer) extends it: publish, roll back, consolidate, prune.

    publish(sess, job, outcome, moved, probes_before, check, hold)   # the next version after a file; `done`/`held`
    accept_held(sess, version) / reject_held(sess, version)           # a version the forgetting gate held
    rollback(sess, interrupted)                       # an old version current again, as a new one
    consolidate_now(sess, msg)                        # merged into a new base; a fresh adapter on it
    answer_already_trained(sess, job_id)              # a file the current version has learnt

Every version's manifest is made here, by `next_manifest`: its number, its
parent, the base it continues (the config's, or a consolidated generation's,
with the base's precision and GGUF source) and when; each caller adds what the
version is (a file's figures, a rollback's `rollback_of`, a generation's start).
The manifest's shape is daemon.adapters.AdapterManifest.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon import adapters, atomic, control, protocol
from daemon.adapters import AdapterManifest
from daemon.config import Config
from daemon.diskspace import require_space
from daemon.train import checkpoint as ckpt
from daemon.train import consolidate
from daemon.train.activity_probe import ActivityProbe, Grid
from daemon.train import forgetting
from daemon.train.model import load_adapter, load_for_training, lora_state, publish_adapter, set_lora_state
from daemon.train.session import Session

log = logging.getLogger(__name__)


def base_fields(sess: Session) -> dict[str, Any]:
    """The base a new version continues: the config's (generation 0, a GGUF's hash where it came from one) or a
    consolidated one; and the precision it was loaded with (model.quantization auto keeps it for the adapter)."""
    m = sess.manifest
    fields: dict[str, Any] = {"generation": m.generation, "quantization": sess.lm.quantization}
    if m.base_path:
        return {**fields, "base_model": m.base_path, "base_path": m.base_path}
    from daemon.train.convert import source_of

    gguf = source_of(sess.lm.base_path)  # a GGUF base: the file's hash, not only the folder it was converted to
    return {**fields, "base_model": sess.cfg.base_model, **({"base_gguf": gguf} if gguf else {})}


def next_manifest(sess: Session, **what: Any) -> AdapterManifest:
    """The next version's manifest: number, parent, the base it continues, when; `what` the version is."""
    fields = {"version": (sess.version or 0) + 1, "parent_version": sess.version, **base_fields(sess),
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "global_step": sess.manifest.global_step, "trained_jobs": list(sess.manifest.trained_jobs), **what}
    return AdapterManifest(**fields)


def publish(sess: Session, job: protocol.Job, outcome: Any, moved: Grid | None,
            probes_before: dict[str, list] | None = None, check: forgetting.FileCheck | None = None,
            hold: bool = False) -> None:
    """Publish the next adapter version, drop the job's checkpoints, answer done (or `held`).

    What the file moved (per module ‖ΔW after − ΔW before‖, from the weights before
    the file, so a resume in between counts nothing twice) goes into the manifest,
    which survives a crash between publication and the `done` answer; so does the
    forgetting report (`check`). With `hold` (the forgetting gate, action hold) the
    version is published but not made current: the caller puts the weights back.
    """
    version = (sess.version or 0) + 1
    report = {**check.report, "version": version} if check is not None else None
    eval_set = forgetting.eval_set_figures(sess.cfg, sess.probes or [], probes_before or {}, check)
    activity = moved.to_dict() if moved is not None else None
    if activity is not None and getattr(outcome, "freezing", None) is not None:  # the next file starts from it
        activity["freezing"] = outcome.freezing
    manifest = next_manifest(
        sess, job_id=job.job_id, original_name=job.original_name, sha256=job.sha256, steps=outcome.steps,
        global_step=outcome.global_step, final_loss=outcome.final_loss, eval_loss=outcome.eval_loss,
        trained_jobs=sess.trained_jobs + [job.job_id], activity_moved=activity,
        ledger=outcome.ledger, eval_set=eval_set, forgetting=report, held=hold)
    # The dataset ledger: what the lineage has learnt, by content (the service refuses a second copy); before the
    # first version, the files merged into the base a START record carried over.
    manifest = dataclasses.replace(manifest, dataset=sess.manifest.learnt() + [manifest.entry()])
    steps_log = ckpt.read_step_log(sess.checkpoints(job.job_id) / ckpt.StepLog.NAME)
    for stale in adapters.held_versions(sess.cfg.path("adapters")):  # a held file that left another way: its number
        log.warning("dropping adapter v%d, held for %s, which is no longer in training", stale.version,
                    stale.manifest.original_name)
        drop_held(sess, stale.manifest)
    if check is not None:  # before the publication: a crash in between trains the file again and writes it again
        forgetting.save_keep_set(sess.cfg, check, version)
    published = publish_adapter(sess.cfg.path("adapters"), sess.lm.model, manifest, steps_log, make_current=not hold)
    if sess.board is not None:
        sess.board.flush()
    if hold:
        log.warning("%s: adapter v%d held by the forgetting gate: %s", job.job_id, version,
                    report["gate"]["message"] if report else "")
        send_held(sess, published.manifest)
        return
    sess.version, sess.manifest = manifest.version, manifest
    if check is not None and check.after:  # the next file's `before`, when every probe example was scored
        sess.probe_rows = (manifest.version, check.after)
    ckpt.delete_checkpoints(sess.checkpoints(job.job_id))
    prune_versions(sess)
    log.info("%s done in %d steps: adapter v%d", job.job_id, outcome.steps, manifest.version)
    if report is not None and report["gate"]["tripped"]:
        log.warning("%s: %s", job.job_id, report["gate"]["message"])
    sess.send(protocol.Done(job_id=job.job_id, steps=outcome.steps, final_loss=outcome.final_loss,
                            eval_loss=outcome.eval_loss, adapter_version=manifest.version,
                            adapter_path=str(published.path), already_trained=False,
                            activity_moved=manifest.activity_moved, eval_set=eval_set,
                            global_step=outcome.global_step, forgetting=report,
                            replay=replay_figures(outcome.ledger),
                            preference=outcome.preference))


def replay_figures(ledger: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a file replayed (its sample ledger's `replay`), without the line lists, for the job record."""
    replay = (ledger or {}).get("replay")
    if not replay:
        return None
    return {**{k: v for k, v in replay.items() if k != "sources"},
            "sources": [{k: v for k, v in s.items() if k != "lines"} for s in replay.get("sources") or []]}


def send_held(sess: Session, manifest: AdapterManifest) -> None:
    """Say that `manifest`'s version is held (again, after a restart): its file waits for accept or reject."""
    report = manifest.forgetting or {}
    message = (f"adapter v{manifest.version} ({manifest.original_name}) is held: "
               f"{(report.get('gate') or {}).get('message') or 'the forgetting gate tripped'}; "
               f"`trainctl adapters accept {manifest.version}` makes it current, "
               f"`trainctl adapters reject {manifest.version}` drops it")
    sess.send(protocol.Held(job_id=manifest.job_id or "", version=manifest.version, forgetting=report,
                            message=message))


def held_for(sess: Session, job_id: str) -> AdapterManifest | None:
    """The held version of this file, if the gate held it (a restart sends `held` again, without training)."""
    for v in adapters.held_versions(sess.cfg.path("adapters")):
        if v.manifest.job_id == job_id:
            return v.manifest
    return None


def accept_held(sess: Session, version: int) -> None:
    """A held version becomes current; its file is learnt: answer `done` for it."""
    folder = sess.cfg.path("adapters")
    held = next((v for v in adapters.held_versions(folder) if v.version == version), None)
    if held is None:
        sess.send(protocol.HeldRefused(version=version, message=f"adapter v{version} is not held"))
        return
    load_adapter(sess.lm.model, held.path)
    accepted = adapters.accept_held(folder, version)
    sess.probe.forget_previous()
    m = accepted.manifest
    sess.version, sess.manifest, sess.probe_rows = m.version, m, None
    if m.job_id:
        ckpt.delete_checkpoints(sess.checkpoints(m.job_id))
    prune_versions(sess)
    log.info("adapter v%d accepted: current; %s is learnt", version, m.original_name)
    sess.send(protocol.Done(job_id=m.job_id or "", steps=m.steps, final_loss=m.final_loss, eval_loss=m.eval_loss,
                            adapter_version=m.version, adapter_path=str(accepted.path), already_trained=False,
                            activity_moved=m.activity_moved, eval_set=m.eval_set, global_step=m.global_step,
                            forgetting=m.forgetting))


def drop_held(sess: Session, m: AdapterManifest) -> None:
    """A held version's folder goes, with its file's checkpoints and keep-set (rejected or skipped)."""
    adapters.drop_version(sess.cfg.path("adapters"), m.version)
    if m.job_id:
        ckpt.delete_checkpoints(sess.checkpoints(m.job_id))
        forgetting.keep_path(sess.cfg, m.job_id).unlink(missing_ok=True)
        sess.keep_sets.pop(m.job_id, None)


def reject_held(sess: Session, version: int) -> None:
    """A held version is dropped; its file fails with reason `forgetting` (its keep-set goes too)."""
    folder = sess.cfg.path("adapters")
    held = next((v for v in adapters.held_versions(folder) if v.version == version), None)
    if held is None:
        sess.send(protocol.HeldRefused(version=version, message=f"adapter v{version} is not held"))
        return
    m = held.manifest
    drop_held(sess, m)
    log.info("adapter v%d rejected: dropped; %s fails (forgetting)", version, m.original_name)
    report = m.forgetting or {}
    sess.send(protocol.Failed(job_id=m.job_id or "", reason="forgetting", forgetting=report,
                              message=f"adapter v{version} was rejected: "
                                      f"{(report.get('gate') or {}).get('message') or 'held by the forgetting gate'}"))


def answer_already_trained(sess: Session, job_id: str) -> None:
    """The current adapter learnt this job (crash after publish): answer done without training."""
    ckpt.delete_checkpoints(sess.checkpoints(job_id))
    m = sess.manifest
    own = m.job_id == job_id  # the numbers are known only for the newest job
    log.info("%s is already in adapter v%s; not training it again", job_id, sess.version)
    sess.send(protocol.Done(job_id=job_id, steps=m.steps if own else None, final_loss=m.final_loss if own else None,
                            eval_loss=m.eval_loss if own else None, adapter_version=sess.version,
                            adapter_path=str(sess.cfg.path("adapters") / adapters.version_dir_name(sess.version)),
                            already_trained=True, activity_moved=m.activity_moved if own else None))


def prune_versions(sess: Session) -> None:
    """Retention (adapters.keep_last): never the current version nor a pinned one. A failure to prune is
    logged and left for the next publication: it never holds a file back from done/."""
    try:
        protected = control.read_pins(sess.cfg) | fed_consolidations(sess.cfg)
        removed = adapters.prune(sess.cfg.path("adapters"), sess.cfg.adapters.keep_last, protected)
    except OSError:
        log.warning("old adapter versions were not pruned", exc_info=True)
        return
    if removed:
        log.info("retention (adapters.keep_last = %d): removed adapter version(s) %s", sess.cfg.adapters.keep_last,
                 ", ".join(f"v{v}" for v in removed))


def fed_consolidations(cfg: Config) -> set[int]:
    """Adapter versions merged into a consolidated base: kept whatever retention says."""
    out = set()
    for lineage in consolidate.consolidated_root(cfg).glob(f"*/{consolidate.LINEAGE}"):
        try:
            out.add(int(atomic.read_json(lineage)["adapter"]["version"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def rollback(sess: Session, interrupted: str | None) -> None:
    """Make adapter `sess.rollback_to` current again, as a new version (`rollback_of`), and answer `rolled_back`.

    The new version has the old one's weights, global step, trained jobs and ledger: the files trained
    after it are no longer in the lineage (listed as `undone`, not retrained: a copy dropped again trains).
    A file interrupted for it stays in processing/, loses its checkpoints (they continue a state that is
    gone) and trains again from its start on the rolled-back adapter. A refusal (adapters.rollback_refusal,
    asked again here, or a publication that fails: a full disk) changes nothing: not the adapter, and not the
    interrupted file's checkpoints, which are dropped only once the new version is published.
    """
    to, sess.rollback_to = sess.rollback_to, None
    folder = sess.cfg.path("adapters")
    why = adapters.rollback_refusal(folder, to, sess.manifest.generation)
    if why is not None:  # an interrupted file keeps its checkpoints: it resumes from them, on the adapter it had
        log.warning("rollback to v%d refused: %s", to, why)
        sess.send(protocol.RollbackRefused(version=to, job_id=interrupted, message=why))
        return
    target = next(v for v in adapters.versions(folder) if v.version == to)
    kept_weights = lora_state(sess.lm.model)  # put back if the rolled-back version cannot be published
    load_adapter(sess.lm.model, target.path)
    kept = {e["job_id"] for e in target.dataset}
    undone = [e for e in sess.manifest.learnt() if e["job_id"] not in kept]
    t = target.manifest
    manifest = next_manifest(sess, rollback_of=to, steps=0, global_step=t.global_step, final_loss=t.final_loss,
                             eval_loss=t.eval_loss, trained_jobs=list(t.trained_jobs), dataset=target.dataset,
                             undone=undone)
    try:
        require_space(folder, sess.cfg.service.min_free_bytes, "adapter")
        publish_adapter(folder, sess.lm.model, manifest)
    except Exception as e:  # nothing changed: the adapter it had, the checkpoints it had
        set_lora_state(sess.lm.model, kept_weights)
        log.error("rollback to v%d not made: adapter v%d could not be published: %s", to, manifest.version, e)
        sess.send(protocol.RollbackRefused(version=to, job_id=interrupted, message=f"adapter v{manifest.version} "
                                           f"could not be published ({e}); nothing changed"))
        return
    sess.probe.forget_previous()
    if interrupted is not None:  # they continue a state that is gone now
        ckpt.delete_checkpoints(sess.checkpoints(interrupted))
    sess.version, sess.manifest = manifest.version, manifest
    prune_versions(sess)
    log.info("rolled back to adapter v%d as v%d; %d file(s) no longer in the adapter", to, manifest.version, len(undone))
    sess.send(protocol.RolledBack(version=manifest.version, rollback_of=to, job_id=interrupted,
                                  undone=[e.get("original_name") or e["job_id"] for e in undone]))


def consolidate_now(sess: Session, msg: protocol.Consolidate) -> None:
    """Merge the current adapter into its base, then train on with a fresh adapter on the merged base.

    The fresh adapter's publication (its manifest names the new base and generation) is the commit point:
    a crash before it leaves the old generation in use (a complete folder in consolidated_models/ that
    nothing uses yet, never deleted); after it, the next child loads the new base.
    """
    folder = sess.cfg.path("adapters")
    current = adapters.peek_current(folder)
    if current is None:
        sess.send(protocol.ConsolidationRefused(message="nothing to consolidate: no adapter has been published yet"))
        return
    asked_for = msg.adapter_version
    if asked_for is not None and current.version != asked_for and current.manifest.consolidated_from == asked_for:
        # done already: a trainer died after the switch, before its answer; the next one answers from the record
        lineage = atomic.read_json(Path(current.manifest.lineage))
        sess.send(protocol.Consolidated(
            generation=lineage["generation"], path=lineage["path"], adapter_version=current.version,
            consolidated_version=asked_for, max_logit_diff=lineage["verification"]["max_abs_logit_diff"],
            reload_logit_diff=lineage["verification"]["reloaded_max_abs_logit_diff"], seconds=0.0,
            files=len(lineage["files"]), description=lineage["description"]))
        return
    if (why := adapters.nothing_learnt(current)) is not None:  # a copy of the base would block every rollback before it
        log.warning("consolidation refused: %s", why)
        sess.send(protocol.ConsolidationRefused(message=why))
        return
    over = forgetting.probes_over_since_generation(current.manifest.forgetting, sess.cfg.forgetting.max_probe_increase)
    if over and not msg.force:  # the damage would become the next generation's base
        why = (f"a probe is over forgetting.max_probe_increase: {'; '.join(over)}; merging would bake that into the "
               "new base (`trainctl consolidate --force` merges anyway)")
        log.warning("consolidation refused: %s", why)
        sess.send(protocol.ConsolidationRefused(message=why))
        return
    try:
        result = consolidate.consolidate(sess.cfg, current, sess.lm.base_path, msg.description,
                                         current.manifest.generation)
    except Exception as e:  # a refusal or a failed merge: everything stays as it was
        log.error("consolidation refused: %s", e, exc_info=not isinstance(e, consolidate.ConsolidationRefused))
        sess.send(protocol.ConsolidationRefused(message=str(e) or type(e).__name__))
        return
    sess.lm = None  # the old base goes before the new one loads
    gc.collect()
    sess.lm = load_for_training(sess.cfg, seed=sess.cfg.training.seed, base=result.path)
    sess.probe = ActivityProbe(sess.lm.model)
    new_base = str(result.path)
    manifest = next_manifest(
        sess, base_model=new_base, base_path=new_base, generation=result.generation,
        consolidated_from=current.version, lineage=str(result.path / consolidate.LINEAGE),
        description=result.lineage["description"], steps=0, dataset=current.dataset)
    publish_adapter(folder, sess.lm.model, manifest)
    sess.version, sess.manifest = manifest.version, manifest
    prune_versions(sess)
    sess.send(protocol.Consolidated(
        generation=result.generation, path=new_base, adapter_version=manifest.version,
        consolidated_version=current.version, max_logit_diff=result.max_logit_diff,
        reload_logit_diff=result.reload_logit_diff, seconds=result.seconds, files=len(result.lineage["files"]),
        description=result.lineage["description"]))
