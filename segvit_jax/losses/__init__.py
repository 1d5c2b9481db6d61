from segvit_jax.losses.atm import atm_loss

__all__ = ["atm_loss"]
