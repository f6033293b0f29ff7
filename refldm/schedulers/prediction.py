"""What the model predicts, and how to turn one prediction into another.

With x_t = a x_0 + s eps (a = sqrt(abar_t), s = sqrt(1 - abar_t), so a^2 + s^2 = 1) a network may predict
eps ("epsilon", Ho et al. 2020), x_0 ("sample"), or v = a eps - s x_0 ("v_prediction", Salimans & Ho 2022,
"Progressive Distillation", sec. 4 and appendix D). Each is a linear function of (x_t, prediction):

    x_0 = (x_t - s eps) / a          eps = (x_t - a x_0) / s
    x_0 = a x_t - s v                eps = a v + s x_t

These functions take a and s as Python floats (or per-batch arrays on the sample's device) and work on
arrays of any backend.
"""

from __future__ import annotations

__all__ = ["x0_from_eps", "eps_from_x0", "x0_from_v", "eps_from_v", "v_from_x0_eps", "predict_x0", "predict_eps", "x0_from_sigma_prediction"]


def x0_from_eps(sample, eps, a, s):
    """x_0 = (x_t - s eps) / a   (Ho et al. 2020, eq. 15 rearranged)."""
    return (sample - s * eps) / a


def eps_from_x0(sample, x0, a, s):
    """eps = (x_t - a x_0) / s."""
    return (sample - a * x0) / s


def x0_from_v(sample, v, a, s):
    """x_0 = a x_t - s v   (Salimans & Ho 2022, appendix D)."""
    return a * sample - s * v


def eps_from_v(sample, v, a, s):
    """eps = a v + s x_t   (Salimans & Ho 2022, appendix D)."""
    return a * v + s * sample


def v_from_x0_eps(x0, eps, a, s):
    """v = a eps - s x_0   (Salimans & Ho 2022, sec. 4)."""
    return a * eps - s * x0


def predict_x0(prediction_type, model_output, sample, a, s):
    """The model's estimate of x_0, whatever it predicts."""
    if prediction_type == "epsilon":
        return x0_from_eps(sample, model_output, a, s)
    if prediction_type == "v_prediction":
        return x0_from_v(sample, model_output, a, s)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not one of 'epsilon', 'v_prediction', 'sample'")


def predict_eps(prediction_type, model_output, sample, a, s):
    """The model's estimate of eps, whatever it predicts."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return eps_from_v(sample, model_output, a, s)
    if prediction_type == "sample":
        return eps_from_x0(sample, model_output, a, s)
    raise ValueError(f"prediction_type={prediction_type!r} is not one of 'epsilon', 'v_prediction', 'sample'")


def x0_from_sigma_prediction(prediction_type, model_output, sample, sigma):
    """x_0 from the model output at noise level sigma, with x = x_0 + sigma eps:

    epsilon:       x_0 = x - sigma eps
    v_prediction:  x_0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1)   (Salimans & Ho 2022, with
                   a = 1/sqrt(sigma^2+1), s = sigma a, and the model input x a)
    sample:        x_0 = model output
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output
