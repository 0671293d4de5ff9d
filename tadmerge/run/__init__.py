"""A merge run's lifecycle, around the units that cluster/ executes.

driver.py runs one merge: plan, statistics, apply, finalize, publish, and what
a failure leaves behind. The rest is one job each:

- state.py: the resume state in the staging directory's `.tadmerge/` folder
  (plan fingerprint, statistics, input versions, resume log);
- unit_log.py: the resume log of finished units, appended once their bytes are
  durable and checked by crc32 before --resume reuses them;
- inputs.py: the input versions a merge reads, compared on --resume, before
  publishing and by --if-changed;
- stages.py: the statistics and apply stages on an executor (TIES reruns,
  NaN/Inf bookkeeping);
- outputs.py: the output's files besides the units' bytes (shards laid out,
  index, side files, report, emr.json, model card);
- files.py: writing those files, an OSError naming the file.
"""
