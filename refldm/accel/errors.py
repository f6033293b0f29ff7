"""The speed layer's one error: a setting (REFLDM_ACCEL, REFLDM_NUM_THREADS) that cannot be used."""


class AccelError(RuntimeError):
    """An accel setting is invalid; the message names the variable and the values it accepts."""
