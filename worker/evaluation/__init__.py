"""Evaluation of model-written code: the sandbox that runs it (sandbox, runs, identities, selfcheck),
the HumanEval/MBPP harness (harness) and the pass@k estimator (passk)."""
