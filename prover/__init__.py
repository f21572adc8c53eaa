"""The prover: EZKL adjudication circuits per segment, calibration, proofs and verification."""
