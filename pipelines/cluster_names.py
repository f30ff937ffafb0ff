"""Names and quantities as Kubernetes, KServe and MLflow accept them, checked before a run.

Each check returns what is wrong with a value, in words (None when nothing is), so that the
caller can name the parameter or key it came from. Each rule cites where the system that would
refuse the value encodes it.
"""

from __future__ import annotations

import posixpath
import re

from fineserve.core.errors import shown

#: k8s.io/apimachinery pkg/util/validation/validation.go: dns1123LabelFmt and
#: DNS1123LabelMaxLength (namespaces: pkg/api/validation/generic.go, ValidateNamespaceName).
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
#: The same file: dns1123SubdomainFmt and DNS1123SubdomainMaxLength (most object names:
#: Secrets, ServiceAccounts, PersistentVolumeClaims).
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_MAX, SUBDOMAIN_MAX = 63, 253
#: KServe's webhook, pkg/apis/serving/v1beta1/inference_service_validation.go: IsvcNameFmt
#: (a DNS-1035 label: apimachinery's dns1035LabelFmt).
_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: KServe names the predictor's Service `NAME-predictor`, or `NAME-PREDICTOR_NAME-predictor` for
#: a named predictor (pkg/constants/constants.go: PredictorServiceName), and a Service name is
#: a 63-character DNS-1035 label. Standard mode names each version's predictor `predictor-vN`
#: (fineserve.core.inference_service.standard_predictor_name): room is left for N of up to
#: this many digits.
VERSION_DIGITS = 5
#: MLflow's registry: registered_models.name is a String(256) column
#: (mlflow/store/model_registry/dbmodels/models.py), as is experiments.name
#: (mlflow/store/dbmodels/models.py).
MLFLOW_NAME_MAX = 256
#: Kubernetes' quantity grammar (k8s.io/apimachinery pkg/api/resource/quantity.go, the
#: serialization format): a signed decimal number and one suffix, no spaces.
_QUANTITY = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")


def _too_long(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"is {len(value)} characters long, at most {limit} are allowed"
    return None


def dns1123_label_problem(value: str) -> str | None:
    """What keeps ``value`` from being a DNS-1123 label (a namespace name), or None."""
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
            "with a letter or digit"
        )
    return _too_long(value, LABEL_MAX)


def dns1123_subdomain_problem(value: str) -> str | None:
    """What keeps ``value`` from being a DNS-1123 subdomain (most object names), or None."""
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a Kubernetes object name: lowercase letters, digits, '-' and '.', starting "
            "and ending with a letter or digit"
        )
    return _too_long(value, SUBDOMAIN_MAX)


def inference_service_max_length(standard_mode: bool) -> int:
    """The longest InferenceService name whose predictor Service name KServe can create."""
    suffix = "-predictor"
    if standard_mode:
        suffix = f"-predictor-v{'9' * VERSION_DIGITS}" + suffix
    return LABEL_MAX - len(suffix)


def inference_service_problem(value: str, *, standard_mode: bool = False) -> str | None:
    """What KServe (or the Service it makes from the name) would refuse in ``value``, or None."""
    if not _ISVC_NAME.fullmatch(value):
        return (
            "must be a DNS-1035 label, as KServe requires: lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    limit = inference_service_max_length(standard_mode)
    if len(value) > limit:
        mode = "Standard" if standard_mode else "Serverless"
        service = "NAME-predictor-vVERSION-predictor" if standard_mode else "NAME-predictor"
        return (
            f"is {len(value)} characters long: in {mode} mode at most {limit}, as KServe names "
            f"the predictor's Service {service} (at most {LABEL_MAX} characters)"
        )
    return None


def registered_model_name_problem(value: str) -> str | None:
    """What MLflow's model registry would refuse in ``value``, or None.

    mlflow/utils/validation.py `_validate_model_name`: not blank, no '/' or ':', and the name
    must stay itself as a path (`path_not_unique`); its file store
    (mlflow/store/model_registry/file_store.py) also refuses '%' and path separators; its SQL
    store keeps at most 256 characters. fineserve searches versions with a filter that quotes
    the name in single quotes, so a single quote is refused too.
    """
    if not value.strip():
        return "must not be empty"
    bad = sorted({c for c in value if c in "/:%'\\"})
    if bad:
        return f"must not contain {' or '.join(map(repr, bad))}"
    normalized = posixpath.normpath(value)
    if normalized != value or normalized == "." or normalized.startswith(".."):
        return f"must stay the same name when read as a path (it reads as {shown(normalized)})"
    return _too_long(value, MLFLOW_NAME_MAX)


def experiment_name_problem(value: str) -> str | None:
    """What MLflow would refuse as an experiment name, or None (not blank, at most 256)."""
    if not value.strip():
        return "must not be empty"
    return _too_long(value, MLFLOW_NAME_MAX)


def quantity_problem(value: str) -> str | None:
    """What keeps ``value`` from being a positive Kubernetes quantity (500m, 2, 512Mi), or None.

    The syntax is Kubernetes' own; the value is read with `kubernetes.utils.parse_quantity`
    (which alone would also take spaces, `inf` and `nan`).
    """
    from kubernetes.utils import parse_quantity

    if not _QUANTITY.fullmatch(value):
        return "must be a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi"
    if parse_quantity(value) <= 0:
        return "must be a quantity above 0"
    return None
