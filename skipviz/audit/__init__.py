"""Audit trail: every skip decision for every input, stored, reproducible and exportable.

* :mod:`~skipviz.audit.records` - :class:`AuditRecord` (one input in one run: input hash and image metadata,
  model and weights hashes, the policy, every block's decision, the prediction, the FULL network's prediction
  on the same input (shadow run), agreement, KL(full || skipped), FLOPs, latency, device, versions, timestamp,
  label; or the error text for an input that could not be read), :class:`AuditRun`, :class:`ReproResult`.
* :mod:`~skipviz.audit.store` - the SQLite store (:class:`AuditStore`); :mod:`~skipviz.audit.archive` - inputs
  from folders, files and zip archives, safely.
* :mod:`~skipviz.audit.run` - :func:`run_audit`, :func:`audit_uploaded_files`, :func:`load_run`, resuming an
  interrupted run (``resume=True``, :func:`find_resumable_run`), :func:`measure_run_latency` (the paired
  latency of a run on a sample of its own inputs).
* :mod:`~skipviz.audit.shadow` - :class:`ShadowPlan`: which inputs go through the full network too (every one by
  default, or a sample chosen by SHA-256), and reusing the full network's output kept for the same input bytes.
* :mod:`~skipviz.audit.reproduce` - :func:`reproduce`, :func:`reproduce_many`, :func:`reproduce_sample`.
* :mod:`~skipviz.audit.report` - the HTML/JSON/CSV report of a stored run (it never runs the network).

Private helpers: ``_store_schema`` (the database schema and migrations) and ``_store_queries`` (record queries)
under the store, ``_batches`` (one batch loaded and run) under the run, ``_report_html`` (the page) under the
report.

The ``skipviz audit`` command is :mod:`skipviz.cli.audit`; throughput is :func:`skipviz.measure.runs.measure_throughput`.
"""
from .archive import ArchiveError, InputItem, ZipLimits, collect_inputs, input_keys, items_from_uploads, read_source
from .records import GPU_ATOL, AuditRecord, AuditRun, ReproResult, records_to_dataframe
from .reproduce import rebuild_model, reproduce, reproduce_many, reproduce_sample
from .run import (audit_items, audit_uploaded_files, find_resumable_run, load_run, measure_run_latency, model_name_of,
                  params_sha256, run_audit)
from .shadow import ShadowPlan
from .store import AuditStore, SchemaVersionError, StoreError

__all__ = ["ArchiveError", "AuditRecord", "AuditRun", "AuditStore", "GPU_ATOL", "InputItem", "ReproResult",
           "SchemaVersionError", "StoreError", "ZipLimits", "audit_items", "audit_uploaded_files", "collect_inputs",
           "find_resumable_run", "input_keys", "items_from_uploads", "load_run", "measure_run_latency", "model_name_of", "params_sha256", "rebuild_model", "records_to_dataframe",
           "read_source", "reproduce", "reproduce_many", "reproduce_sample", "run_audit", "ShadowPlan"]
