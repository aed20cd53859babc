"""Measurement harnesses behind `spindle bench {kernels,cp,e2e}`; each module exposes main(argv) -> int."""
