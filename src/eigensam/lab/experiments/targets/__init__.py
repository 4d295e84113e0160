"""The paper's reproduction targets, one module each, built on the machinery of
:mod:`eigensam.lab.experiments` (runs, planning, verdicts, report)."""
