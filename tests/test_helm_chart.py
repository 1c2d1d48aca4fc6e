"""The Helm chart: ``helm lint``, rendered manifests, the values schema, and drift against the settings.

Helm itself runs through ``helm-sdkpy`` (Helm's Go library in a wheel) in its own venv on Python >= 3.12
(``.venv-helm``, made on demand from ``requirements-helm.lock``). helm-sdkpy has no ``template`` call, so
the chart is rendered the way ``helm install`` renders it, against a stand-in Kubernetes API on loopback
that answers discovery and accepts every object: Helm validates the values against
``values.schema.json``, runs the templates (including their ``fail`` checks) and returns the manifest.

Without Python 3.12 the Helm tests skip locally and fail in CI (``CI=true``); the schema and drift tests
that need no Helm always run.
"""

from __future__ import annotations

import base64
import copy
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml
from services import service_missing

from worker.settings import MIN_SECRET_CHARS, REDIS_URL_OPTIONS, SECRET_FIELDS, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "coc-change-worker"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
MINIMAL_VALUES = CHART / "ci" / "minimal-values.yaml"
HELM_LOCK = ROOT / "requirements-helm.lock"
HELM_VENV = ROOT / ".venv-helm"
HELM_STAMP = HELM_VENV / ".installed"

#: The settings issue 3 names as the documented contract; each must be reachable through values.
CONTRACT = [
    "KAFKA_BOOTSTRAP_SERVERS",
    "INPUT_TOPIC",
    "RESULTS_TOPIC",
    "DLQ_TOPIC",
    "GROUP_ID",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
    "KAFKA_SSL_KEY_PASSWORD",
    "API_ENDPOINT",
    "API_REGION",
    "API_AK",
    "API_SK",
    "API_TOKEN",
    "API_DOMAIN_ID",
    "DEDUP_URL",
    "MAX_IN_FLIGHT",
    "HTTP_PORT",
    "RETRY_MAX_ATTEMPTS",
    "RETRY_MAX_ELAPSED_S",
    "SHUTDOWN_GRACE_S",
]


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values over the chart's: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def readme_example() -> dict[str, Any]:
    """The values example of the README's "Deploy on Kubernetes" section (kept true by rendering it)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").partition("## Deploy on Kubernetes")[2]
    match = re.search(r"```yaml\n(# my-values.yaml\n.*?)```", text, re.DOTALL)
    assert match, "README: no values example in 'Deploy on Kubernetes'"
    example: dict[str, Any] = yaml.safe_load(match[1])
    return example


def readme_ingress_deployment(text: str) -> dict[str, Any]:
    """The standalone ingress Deployment of the README's "Monitoring: Alertmanager into the ingress"."""
    match = re.search(r"```yaml\n(# coc-ingest\.yaml.*?)```", text, re.DOTALL)
    assert match, "README: no coc-ingest.yaml example"
    deployment: dict[str, Any] = next(d for d in yaml.safe_load_all(match[1]) if d["kind"] == "Deployment")
    return deployment


DEFAULTS = load_yaml(CHART / "values.yaml")
FULL = load_yaml(FULL_VALUES)
#: The defaults plus what the worker cannot start without (the chart refuses to render without it).
MINIMAL = load_yaml(MINIMAL_VALUES)
README_EXAMPLE = readme_example()
SCHEMA = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


# --- the values cases ------------------------------------------------------------------------------
#: Values that must render. "default" is the chart's defaults with the least they need (ci/minimal-values.yaml),
#: "full" the full-featured file; the rest vary one concern each.
GOOD: dict[str, dict[str, Any]] = {
    "default": MINIMAL,
    "full": FULL,
    "full_config_changed": merged(FULL, {"worker": {"maxInFlight": 64}}),
    "full_secret_changed": merged(FULL, {"secrets": {"apiToken": "another-token"}}),
    "aksk_endpoint_hpa": {
        "api": {"endpoint": "https://coc.example.test", "auth": "aksk", "caSecret": {"name": "api-ca"}},
        "secrets": {"apiAk": "test-ak-value", "apiSk": "test-sk-value"},
        "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
        "kafka": {"securityProtocol": "SSL", "ssl": {"verify": False}, "createTopics": True},
        "autoscaling": {"hpa": {"enabled": True, "minReplicas": 2, "maxReplicas": 12}},
        "podAntiAffinity": "hard",
        "podLabels": {"team": "payments"},
    },
    "readme_example": README_EXAMPLE,
    "redis_tls": merged(
        MINIMAL,
        {
            "dedup": {
                "backend": "redis",
                "redis": {
                    "url": "rediss://redis:6380/0?ssl_ca_certs=/etc/coc-worker/redis-tls/ca.crt",
                    "tlsSecret": "redis-tls-files",
                },
            },
        },
    ),
    "autoscaler_owns_the_replica_count": merged(  # replicaCount is not rendered, so not checked
        MINIMAL,
        {
            "replicaCount": 3,
            "kafka": {"inputTopicPartitions": 2},
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "autoscaling": {"hpa": {"enabled": True, "minReplicas": 1, "maxReplicas": 2}},
        },
    ),
    "existing_secret_pvc": {
        "api": {"region": "cn-north-4"},
        "replicaCount": 1,
        "secrets": {"existingSecret": "coc-worker-credentials"},
        "kafka": {"securityProtocol": "SASL_PLAINTEXT", "sasl": {"mechanism": "PLAIN", "username": "u"}},
        "persistence": {"type": "pvc", "size": "2Gi"},
    },
    "pdb_min_available_below_the_replicas": merged(
        MINIMAL,
        {
            "replicaCount": 3,
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "podDisruptionBudget": {"minAvailable": 2},
        },
    ),
    # 66% of 3 rounds up to 2: one pod may go
    "pdb_min_available_percent_below_the_replicas": merged(
        MINIMAL,
        {
            "replicaCount": 3,
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "podDisruptionBudget": {"minAvailable": "66%"},
        },
    ),
    "keda_scale_to_zero": merged(FULL, {"autoscaling": {"keda": {"minReplicaCount": 0}}}),
    "keda_scale_to_zero_sqlite_on_a_pvc": merged(
        MINIMAL,
        {
            "persistence": {"type": "pvc"},
            "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 1}},
        },
    ),
    # a values file from before the key was retired: accepted (an upgrade must not fail on it), ignored
    "keda_old_offset_reset_policy": merged(FULL, {"autoscaling": {"keda": {"offsetResetPolicy": "latest"}}}),
    "redis_url_with_options": merged(
        MINIMAL,
        {
            "dedup": {
                "backend": "redis",
                "redis": {"url": "redis://redis-master:6379/0?db=1&prefix=x", "minReplicas": 1},
            },
        },
    ),
    "redis_forgotten_window_off": merged(
        MINIMAL,
        {
            "dedup": {
                "backend": "redis",
                "redis": {"url": "redis://redis-master:6379/0", "forgottenWindowS": 0},
            }
        },
    ),
    # the password alone from a Secret of another chart (Bitnami's key), the URL in the ConfigMap
    "redis_password_secret": merged(
        MINIMAL,
        {
            "replicaCount": 2,
            "dedup": {
                "backend": "redis",
                "redis": {
                    "url": "redis://redis-master.data:6379/0",
                    "passwordSecret": {"name": "redis", "key": "redis-password"},
                },
            },
        },
    ),
    # OpenShift's restricted-v2 SCC assigns the UID and fsGroup from the namespace's range, and
    # refused the pod when the chart named its own
    "platform_assigns_the_pod_identity": merged(
        MINIMAL, {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    ),
    # the shortest secrets the worker takes, counted in characters (each "é" is two bytes)
    "secrets_of_the_least_length": merged(
        MINIMAL,
        {
            "api": {"auth": "token"},
            "kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN", "username": "u"}},
            "secrets": {"apiToken": "t" * MIN_SECRET_CHARS, "kafkaSaslPassword": "é" * MIN_SECRET_CHARS},
        },
    ),
    "aksk_secret_key_of_the_least_length": merged(MINIMAL, {"secrets": {"apiSk": "s" * MIN_SECRET_CHARS}}),
    # a Strimzi KafkaUser with `authentication: tls`: its Secret's user.crt and user.key (the
    # defaults), the cluster CA's Secret beside it
    "strimzi_tls_user": merged(
        MINIMAL,
        {
            "kafka": {
                "securityProtocol": "SSL",
                "ssl": {
                    "caSecret": {"name": "my-cluster-cluster-ca-cert"},
                    "clientSecret": {"name": "coc-worker"},
                },
            }
        },
    ),
    # MSK with TLS client authentication: brokers with publicly trusted certificates (no CA
    # Secret), the worker's key encrypted, its password in a Secret the user manages, KEDA on lag
    "msk_client_certificate_keda": {
        "api": {"region": "cn-north-4"},
        "secrets": {"existingSecret": "coc-worker-credentials"},
        "kafka": {
            "securityProtocol": "SSL",
            "ssl": {
                "clientSecret": {
                    "name": "coc-worker-msk-client",
                    "certKey": "client.pem",
                    "keyKey": "client-key.pem",
                    "encryptedKey": True,
                }
            },
        },
        "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
        "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 1, "maxReplicaCount": 3}},
    },
    # the key's password at the worker's length, and Secret names YAML would read as a boolean and
    # a number: quoted, or the API server refuses the manifest
    "client_key_password_and_secret_names_not_strings": merged(
        MINIMAL,
        {
            "kafka": {
                "securityProtocol": "SSL",
                "ssl": {"clientSecret": {"name": "true", "certKey": "123", "encryptedKey": True}},
            },
            "secrets": {"kafkaSslKeyPassword": "pw-" + "k" * MIN_SECRET_CHARS},
            "dedup": {
                "backend": "redis",
                "redis": {
                    "url": "redis://redis-master:6379/0",
                    "passwordSecret": {"name": "null", "key": "1"},
                },
            },
        },
    ),
    # release names YAML would read as a number and a boolean (RELEASE_NAMES): quoted in the labels
    "release_named_like_a_number": MINIMAL,
    "release_named_like_a_boolean": MINIMAL,
    # every endpoint on another port than the egress rules' defaults, each port opened
    "network_policy_with_the_endpoints_ports": merged(
        MINIMAL,
        {
            "kafka": {"bootstrapServers": "kafka-0.kafka:9093, kafka-1.kafka:9094"},
            "api": {"endpoint": "https://gw.example.com:8443/coc"},
            "dedup": {"backend": "redis", "redis": {"url": "rediss://redis:6380/0"}},
            "networkPolicy": {
                "enabled": True,
                "kafka": {"peers": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [9093, 9094]},
                "api": {"peers": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [8443]},
                "redis": {"peers": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [6380]},
            },
        },
    ),
    # through an egress proxy the API's rule is the proxy's: its port is not the endpoint's
    "network_policy_api_through_a_proxy": merged(
        MINIMAL,
        {
            "api": {"endpoint": "https://gw.example.com:8443"},
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.infra:3128"}],
            "networkPolicy": {
                "enabled": True,
                "kafka": {"peers": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
                "api": {"peers": [{"ipBlock": {"cidr": "10.2.0.0/16"}}], "ports": [3128]},
            },
        },
    ),
    # Prometheus takes a scrape timeout equal to the interval, in other units too
    "service_monitor_timeout_as_long_as_the_interval": merged(
        MINIMAL, {"serviceMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "60s"}}
    ),
    # the rolling update as given; with a hard anti-affinity too, where a node is known to be free
    "update_strategy_given": merged(
        MINIMAL,
        {
            "replicaCount": 4,
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "updateStrategy": {"maxSurge": "25%", "maxUnavailable": 0},
        },
    ),
    "update_strategy_given_with_hard_anti_affinity": merged(
        MINIMAL,
        {
            "replicaCount": 3,
            "podAntiAffinity": "hard",
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "updateStrategy": {"maxSurge": 1},
        },
    ),
    # a required anti-affinity of the user's own (any topology): as podAntiAffinity: hard
    "required_anti_affinity_in_affinity": merged(
        MINIMAL,
        {
            "replicaCount": 3,
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "affinity": {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "topologyKey": "topology.kubernetes.io/zone",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "coc-change-worker"}},
                        }
                    ]
                }
            },
        },
    ),
}

#: GOOD cases installed under another release name than "coc".
RELEASE_NAMES = {"release_named_like_a_number": "2024", "release_named_like_a_boolean": "true"}

#: A NetworkPolicy with the peers it needs (the ports left at the chart's defaults): each BAD case
#: below moves one endpoint off its rule's ports.
NETWORK_POLICY: dict[str, Any] = {
    "networkPolicy": {
        "enabled": True,
        "kafka": {"peers": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "api": {"peers": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]},
        "redis": {"peers": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]},
    }
}

#: A secret one character too short for the worker, and not a word an error message would hold.
SHORT = "short-secret"[: MIN_SECRET_CHARS - 1]
SASL = {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN", "username": "u"}}

#: Values Helm must refuse, and a fragment of the reason it must give. Each case is MINIMAL plus
#: one mistake (see BAD below), so it fails for that mistake and not for a value MINIMAL sets.
_BAD: dict[str, tuple[dict[str, Any], str]] = {
    # the chart's own defaults (MINIMAL's values emptied again): the worker would exit at start
    "chart_defaults": (
        {"api": {"region": ""}, "secrets": {"apiAk": "", "apiSk": ""}},
        "set api.endpoint or api.region",
    ),
    "aksk_without_access_key": ({"secrets": {"apiAk": ""}}, "set secrets.apiAk: api.auth=aksk"),
    # blank counts as empty: the worker strips the file's content
    "aksk_without_secret_key": ({"secrets": {"apiSk": " \n"}}, "set secrets.apiSk: api.auth=aksk"),
    "token_without_token": ({"api": {"auth": "token"}}, "set secrets.apiToken: api.auth=token"),
    "sasl_without_password": (
        {"kafka": SASL},
        "set secrets.kafkaSaslPassword: kafka.securityProtocol=SASL_SSL",
    ),
    # secrets the worker refuses ("at least 8 are needed"), named by key, never shown
    "short_secret_key": ({"secrets": {"apiSk": SHORT}}, f"secrets.apiSk has {len(SHORT)} characters"),
    "short_token": (
        {"api": {"auth": "token"}, "secrets": {"apiToken": SHORT}},
        f"secrets.apiToken has {len(SHORT)} characters",
    ),
    "short_sasl_password": (
        {"kafka": SASL, "secrets": {"kafkaSaslPassword": SHORT}},
        f"secrets.kafkaSaslPassword has {len(SHORT)} characters",
    ),
    # an encrypted client key: its password must be in the chart-made Secret, and belongs to a key
    "encrypted_client_key_without_password": (
        {
            "kafka": {
                "securityProtocol": "SSL",
                "ssl": {"clientSecret": {"name": "coc-worker", "encryptedKey": True}},
            }
        },
        "set secrets.kafkaSslKeyPassword: kafka.ssl.clientSecret.encryptedKey=true needs it",
    ),
    "encrypted_client_key_without_its_secret": (
        {
            "kafka": {"ssl": {"clientSecret": {"encryptedKey": True}}},
            "secrets": {"kafkaSslKeyPassword": SHORT},
        },
        "kafka.ssl.clientSecret.encryptedKey needs kafka.ssl.clientSecret.name",
    ),
    "client_key_password_never_used": (
        {
            "kafka": {"securityProtocol": "SSL", "ssl": {"clientSecret": {"name": "coc-worker"}}},
            "secrets": {"kafkaSslKeyPassword": SHORT},
        },
        "secrets.kafkaSslKeyPassword is set, but the chart passes it only with",
    ),
    "short_client_key_password": (
        {
            "kafka": {
                "securityProtocol": "SSL",
                "ssl": {"clientSecret": {"name": "u", "encryptedKey": True}},
            },
            "secrets": {"kafkaSslKeyPassword": SHORT},
        },
        f"secrets.kafkaSslKeyPassword has {len(SHORT)} characters",
    ),
    # a certificate that a protocol without TLS would never show: only "broker unreachable" then
    "client_certificate_without_tls": (
        {"kafka": {"ssl": {"clientSecret": {"name": "coc-worker"}}}},
        "kafka.ssl.clientSecret.name is set with kafka.securityProtocol=PLAINTEXT, which uses no TLS",
    ),
    "client_certificate_key_not_a_secret_key": (
        {
            "kafka": {
                "securityProtocol": "SSL",
                "ssl": {"clientSecret": {"name": "coc-worker", "certKey": "user crt"}},
            }
        },
        "certKey",
    ),
    # long enough in bytes, not in characters (the worker counts characters)
    "short_secret_key_in_characters": (
        {"secrets": {"apiSk": "é" * (MIN_SECRET_CHARS - 1)}},
        f"secrets.apiSk has {MIN_SECRET_CHARS - 1} characters",
    ),
    # a second app.kubernetes.io/instance in the pod template, unlike the Deployment's selector
    "pod_label_replaces_a_selector_label": (
        {"podLabels": {"app.kubernetes.io/instance": "other"}},
        "podLabels sets app.kubernetes.io/instance",
    ),
    "redis_url_port_out_of_range": (
        {"dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:99999/0"}}},
        "url",
    ),
    "negative_replicas": ({"replicaCount": -1}, "replicaCount"),
    "unknown_protocol": ({"kafka": {"securityProtocol": "SASL_TLS"}}, "securityProtocol"),
    "unknown_key": ({"replicas": 3}, "replicas"),
    "root_user": ({"podSecurityContext": {"runAsUser": 0}}, "runAsUser"),
    "zero_shutdown_grace": ({"worker": {"shutdownGraceS": 0}}, "shutdownGraceS"),
    # a PodDisruptionBudget that never allows an eviction blocks every node drain
    "pdb_min_available_of_every_replica": ({"podDisruptionBudget": {"minAvailable": 1}}, "minAvailable=1"),
    "pdb_min_available_all": ({"podDisruptionBudget": {"minAvailable": "100%"}}, "minAvailable=100%"),
    "pdb_max_unavailable_zero": ({"podDisruptionBudget": {"maxUnavailable": 0}}, "maxUnavailable=0"),
    "pdb_max_unavailable_zero_percent": (
        {"podDisruptionBudget": {"maxUnavailable": "0%"}},
        "maxUnavailable=0%",
    ),
    # Kubernetes rounds a percentage up: 50% of 1 pod is 1, 67% of 3 is 3
    "pdb_min_available_percent_one_replica": (
        {"podDisruptionBudget": {"minAvailable": "50%"}},
        "minAvailable=50% with 1 replica(s) (50% of 1 rounds up to 1)",
    ),
    "pdb_min_available_67_percent_three_replicas": (
        {
            "replicaCount": 3,
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "podDisruptionBudget": {"minAvailable": "67%"},
        },
        "minAvailable=67% with 3 replica(s) (67% of 3 rounds up to 3)",
    ),
    # scaled to zero, KEDA wakes one pod: minAvailable=1 then blocks every drain
    "pdb_min_available_keda_scale_to_zero": (
        merged(
            FULL,
            {"autoscaling": {"keda": {"minReplicaCount": 0}}, "podDisruptionBudget": {"minAvailable": 1}},
        ),
        "minAvailable=1 with 1 replica (autoscaling.keda.minReplicaCount=0",
    ),
    # scaled to zero, the pod goes and a store that lives in it (sqlite on an emptyDir, memory) too
    "keda_scale_to_zero_with_the_dedup_store_in_the_pod": (
        {"autoscaling": {"keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 1}}},
        "every scale to zero removes the pod and the dedup store with it",
    ),
    "keda_scale_to_zero_with_the_memory_store_on_a_pvc": (
        {
            "dedup": {"backend": "memory"},
            "persistence": {"type": "pvc"},
            "autoscaling": {"keda": {"enabled": True, "minReplicaCount": 0, "maxReplicaCount": 1}},
        },
        "dedup.backend=memory on persistence.type=pvc",
    ),
    "sasl_without_mechanism": ({"kafka": {"securityProtocol": "SASL_SSL"}}, "mechanism"),
    "password_in_redis_url": (
        {"dedup": {"backend": "redis", "redis": {"url": "redis://:pw@redis:6379/0"}}},
        "url",
    ),
    # a URL option the worker refuses, and the ConfigMap would show in clear
    "password_in_redis_url_query": (
        {"dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0?password=s3cr3t"}}},
        "url",
    ),
    "username_in_redis_url_query": (
        {"dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0?username=admin"}}},
        "url",
    ),
    # Helm's schema check quotes a value that breaks a pattern: these three never are (a URL with
    # its password put here by mistake), whatever is wrong with them.
    "secret_in_redis_url": (
        {"dedup": {"backend": "redis", "redis": {"url": "redis://:S3cret-in-values@redis:6379/0"}}},
        "secrets.redisUrl",
    ),
    "secret_in_bootstrap_servers": (
        {"kafka": {"bootstrapServers": "user:S3cret-in-values@kafka:9092"}},
        "bootstrapServers",
    ),
    "secret_in_endpoint": ({"api": {"endpoint": "https://ak:S3cret-in-values@coc.example.com"}}, "endpoint"),
    "setting_in_extra_env": ({"extraEnv": [{"name": "COC_WORKER_MAX_IN_FLIGHT", "value": "1"}]}, "extraEnv"),
    # the worker reads its settings whatever their case: this one got past a case-sensitive check
    "setting_in_extra_env_lower_case": (
        {"extraEnv": [{"name": "coc_worker_dedup_url", "value": "memory://"}]},
        "extraEnv",
    ),
    "replicas_over_partitions": (
        {"replicaCount": 13, "kafka": {"inputTopicPartitions": 12}},
        "inputTopicPartitions",
    ),
    "keda_over_partitions": (
        merged(FULL, {"autoscaling": {"keda": {"maxReplicaCount": 25}}}),
        "inputTopicPartitions",
    ),
    "hpa_over_partitions": (
        {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 13}}, "kafka": {"inputTopicPartitions": 12}},
        "inputTopicPartitions",
    ),
    "hpa_and_keda": (
        {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}},
        "enabled",
    ),
    "pvc_with_two_replicas": ({"persistence": {"type": "pvc"}, "replicaCount": 2}, "one replica"),
    "network_policy_without_brokers": (
        {"networkPolicy": {"enabled": True, "api": {"peers": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}}},
        "networkPolicy.kafka.peers",
    ),
    "existing_secret_and_inline": (
        {"secrets": {"existingSecret": "mine", "apiAk": "inline"}},
        "existingSecret",
    ),
    "redis_without_url": ({"dedup": {"backend": "redis"}}, "dedup.redis.url"),
    # the password alone says nothing of where Redis is (and the whole URL would come from secrets)
    "redis_password_secret_without_url": (
        {"dedup": {"backend": "redis", "redis": {"passwordSecret": {"name": "redis"}}}},
        "dedup.redis.passwordSecret needs dedup.redis.url",
    ),
    # the worker refuses a Redis password for another store: the pod would crash-loop
    "redis_password_secret_without_redis": (
        {"dedup": {"redis": {"url": "redis://redis-master:6379/0", "passwordSecret": {"name": "redis"}}}},
        "dedup.redis.passwordSecret.name is set with dedup.backend=sqlite",
    ),
    "redis_password_secret_bad_name": (
        {"dedup": {"backend": "redis", "redis": {"passwordSecret": {"name": "Redis_Secret"}}}},
        "passwordSecret/name",
    ),
    # each pod's own sqlite file: after a rebalance a pod would not know what another applied
    "two_replicas_without_redis": ({"replicaCount": 2}, "dedup.backend=sqlite"),
    "autoscaled_without_redis": (
        {"autoscaling": {"hpa": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}},
        "dedup.backend=sqlite",
    ),
    # settings the worker would refuse at start (the pod would crash-loop)
    "lease_shorter_than_a_call": ({"api": {"requestTimeoutS": 30}}, "dedup.leaseS"),
    "buffer_below_in_flight": ({"worker": {"maxBuffered": 100}}, "worker.maxBuffered"),
    "buffer_bytes_below_a_record": ({"worker": {"maxBufferedBytes": 100}}, "worker.maxBufferedBytes"),
    "domain_id_not_header_safe": ({"api": {"domainId": "abc def"}}, "domainId"),
    "results_topic_is_input": ({"kafka": {"resultsTopic": "coc.change-events"}}, "three different topics"),
    "dlq_topic_dots": ({"kafka": {"dlqTopic": ".."}}, "'..'"),
    "retry_after_over_the_budget": ({"retry": {"maxElapsedS": 30}}, "retry.retryAfterMaxS"),
    "retry_budget_below_a_timed_out_call": (
        {"retry": {"maxElapsedS": 20, "retryAfterMaxS": 20}},
        "retry.maxElapsedS must be at least",
    ),
    "endpoint_with_a_query": ({"api": {"endpoint": "https://gw.example.com/coc?x=1"}}, "endpoint"),
    "endpoint_with_a_dot_segment": ({"api": {"endpoint": "https://gw.example.com/coc/./api"}}, "endpoint"),
    "endpoint_port_out_of_range": ({"api": {"endpoint": "https://gw.example.com:99999"}}, "endpoint"),
    "bootstrap_port_out_of_range": ({"kafka": {"bootstrapServers": "kafka:99999"}}, "bootstrapServers"),
    # the worker refuses these at start (credentials or a scheme taken for a host name)
    "bootstrap_with_credentials": ({"kafka": {"bootstrapServers": "user@kafka:9092"}}, "bootstrapServers"),
    "bootstrap_with_a_path": ({"kafka": {"bootstrapServers": "kafka/x:9092"}}, "bootstrapServers"),
    # a NetworkPolicy whose egress ports miss an endpoint's: rendered, the pod could reach none
    "network_policy_without_a_broker_port": (
        merged(NETWORK_POLICY, {"kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9093"}}),
        "kafka.bootstrapServers names kafka-1.kafka:9093, but networkPolicy.kafka.ports (9092) has no 9093",
    ),
    "network_policy_without_the_api_port": (
        merged(NETWORK_POLICY, {"api": {"endpoint": "https://gw.example.com:8443"}}),
        "api.endpoint https://gw.example.com:8443 is on port 8443, but networkPolicy.api.ports (443)",
    ),
    "network_policy_without_the_http_api_default_port": (
        merged(NETWORK_POLICY, {"api": {"endpoint": "http://gw.example.com/coc"}}),
        "is on port 80, but networkPolicy.api.ports (443) has no 80",
    ),
    "network_policy_without_the_region_port": (
        merged(NETWORK_POLICY, {"networkPolicy": {"api": {"ports": [8443]}}}),
        "api.region cn-north-4 (https) is on port 443, but networkPolicy.api.ports (8443) has no 443",
    ),
    "network_policy_without_the_redis_port": (
        merged(NETWORK_POLICY, {"dedup": {"backend": "redis", "redis": {"url": "rediss://redis:6380/0"}}}),
        "dedup.redis.url is on port 6380, but networkPolicy.redis.ports (6379) has no 6380",
    ),
    "network_policy_without_the_redis_default_port": (
        merged(
            NETWORK_POLICY,
            {
                "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master/0"}},
                "networkPolicy": {"redis": {"ports": [6380]}},
            },
        ),
        "dedup.redis.url is on port 6379, but networkPolicy.redis.ports (6380) has no 6379",
    ),
    # the kubelet's probes reach the pod's IP, never its loopback: every probe would fail
    "http_host_loopback": ({"worker": {"httpHost": "127.0.0.1"}}, "httpHost"),
    # Prometheus refuses a scrape timeout above its interval (the Operator's config reload fails)
    "scrape_timeout_over_the_interval": (
        {"serviceMonitor": {"enabled": True, "interval": "30s", "scrapeTimeout": "1m"}},
        "serviceMonitor.scrapeTimeout (1m) is longer than serviceMonitor.interval (30s)",
    ),
    "scrape_timeout_over_the_interval_in_ms": (
        {"serviceMonitor": {"enabled": True, "interval": "1s", "scrapeTimeout": "1500ms"}},
        "serviceMonitor.scrapeTimeout (1500ms) is longer than serviceMonitor.interval (1s)",
    ),
    # hard anti-affinity makes maxSurge 0: with maxUnavailable 0 too no pod could be replaced
    "rolling_update_that_replaces_no_pod": (
        {
            "replicaCount": 2,
            "podAntiAffinity": "hard",
            "dedup": {"backend": "redis", "redis": {"url": "redis://redis-master:6379/0"}},
            "updateStrategy": {"maxUnavailable": 0},
        },
        "updateStrategy.maxSurge and updateStrategy.maxUnavailable are both 0",
    ),
    "rolling_update_unavailable_over_all": ({"updateStrategy": {"maxUnavailable": "150%"}}, "maxUnavailable"),
}
BAD = {name: (merged(MINIMAL, values), fragment) for name, (values, fragment) in _BAD.items()}

#: The subset of BAD that the JSON Schema alone rejects (the rest are cross-field checks in the templates).
SCHEMA_BAD = [
    "negative_replicas",
    "unknown_protocol",
    "unknown_key",
    "root_user",
    "zero_shutdown_grace",
    "sasl_without_mechanism",
    "password_in_redis_url",
    "password_in_redis_url_query",
    "username_in_redis_url_query",
    "setting_in_extra_env",
    "setting_in_extra_env_lower_case",
    "hpa_and_keda",
    "domain_id_not_header_safe",
    "endpoint_with_a_query",
    "endpoint_with_a_dot_segment",
    "endpoint_port_out_of_range",
    "bootstrap_port_out_of_range",
    "bootstrap_with_credentials",
    "bootstrap_with_a_path",
    "redis_url_port_out_of_range",
    "client_certificate_key_not_a_secret_key",
    "redis_password_secret_bad_name",
    "http_host_loopback",
    "rolling_update_unavailable_over_all",
]


# --- the values schema (jsonschema; no Helm needed) ---------------------------------------------------
def schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def test_schema_is_valid_draft7() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("case", sorted(GOOD))
def test_schema_accepts_good_values(case: str) -> None:
    assert schema_errors(merged(DEFAULTS, GOOD[case])) == []


@pytest.mark.parametrize("case", SCHEMA_BAD)
def test_schema_rejects_bad_values(case: str) -> None:
    values, fragment = BAD[case]
    errors = schema_errors(merged(DEFAULTS, values))
    assert errors, f"{case} passed the schema"
    assert any(fragment in error for error in errors), errors


#: dedup.redis.url values (no credentials: those go in the Secret), and whether the schema takes them.
REDIS_URLS = [
    ("redis://redis-master:6379/0", True),
    ("redis://redis-master:6379/0?db=1&prefix=x", True),
    ("redis://redis-master:6379/0?", True),
    (
        "rediss://redis:6380/0?ssl_ca_certs=/etc/ca/ca.crt&ssl_certfile=/etc/tls/tls.crt"
        "&ssl_keyfile=/etc/tls/tls.key&ssl_cert_reqs=required&ssl_check_hostname=true&prefix=coc:&db=2",
        True,
    ),
    ("redis://:s3cr3t@redis-master:6379/0", False),
    ("redis://redis-master:6379/0?password=s3cr3t", False),
    ("redis://redis-master:6379/0?username=admin", False),
    ("redis://redis-master:6379/0?prefix=x&password=s3cr3t", False),
    ("redis://redis-master:6379/0?db=1#s3cr3t", False),
    ("redis://redis-master:6379/0?ssl_cert_reqs=none", False),  # the ssl_* options need rediss://
    ("rediss://redis:6380/0?ssl_cert_reqs=maybe", False),
    ("redis://redis-master:6379/0?db=one", False),
]


def without_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``COC_WORKER_*`` variable of this process reaches the settings built in the test."""
    for name in list(os.environ):
        if name.startswith("COC_WORKER_"):
            monkeypatch.delenv(name)


def redis_url_errors(url: str) -> list[str]:
    """The schema's errors for ``url`` as the Redis dedup store's address."""
    return schema_errors(merged(DEFAULTS, {"dedup": {"backend": "redis", "redis": {"url": url}}}))


@pytest.mark.parametrize(("url", "taken"), REDIS_URLS)
def test_schema_takes_only_the_redis_url_options_the_worker_takes(
    url: str, taken: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL option the worker refuses (``?password=``) failed only at the pod's start, and sat in
    the ConfigMap in clear until then: the schema takes only the worker's REDIS_URL_OPTIONS."""
    errors = redis_url_errors(url)
    assert (errors == []) is taken, errors
    if taken:  # and the worker starts with it
        without_worker_env(monkeypatch)
        assert WorkerSettings(dedup_url=url).dedup_url == url


#: dedup.redis.url hosts, ports and databases, and whether the worker takes them: the schema must agree.
REDIS_URL_ADDRESSES = [
    ("redis://redis-master", True),
    ("redis://redis-master:6379", True),
    ("redis://redis-master:65535/15", True),
    ("redis://redis-master:6379/", True),
    ("redis://10.0.0.5:6379/0", True),
    ("redis://[fd00::5]:6379/0", True),
    ("rediss://redis.data.svc:6380/2?ssl_cert_reqs=required", True),
    ("redis://redis-master:99999/0", False),
    ("redis://redis-master:65536/0", False),
    ("redis://redis-master:port/0", False),
    ("redis://redis-master:+6379/0", False),
    ("redis://:6379/0", False),
    ("redis:///0", False),
    ("rediss://:6380/0", False),
]


@pytest.mark.parametrize(("url", "taken"), REDIS_URL_ADDRESSES)
def test_schema_takes_the_redis_addresses_the_worker_takes(
    url: str, taken: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema took any characters before the options: an out-of-range or named port, or no
    host at all, rendered, and the worker refused the URL at start ("must be redis://...")."""
    without_worker_env(monkeypatch)
    try:
        WorkerSettings(dedup_url=url)
    except ValueError:
        worker_takes = False
    else:
        worker_takes = True
    assert worker_takes is taken
    errors = redis_url_errors(url)
    assert (errors == []) is taken, errors


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis-master:0/0",  # no server listens on port 0
        "redis://redis-master:/0",  # an empty port
        "redis://redis-master:06379/0",  # as the schema's other ports: no leading zero
        "redis://redis-master:6379/one",  # redis-py ignores a path that is not a number: db 0
        "redis://redis-master:6379/0/",
    ],
)
def test_schema_is_stricter_than_the_worker_on_odd_redis_addresses(url: str) -> None:
    assert redis_url_errors(url)


def test_schema_takes_every_redis_url_option_of_the_worker() -> None:
    taken = {name for url, ok in REDIS_URLS if ok for name in parse_qs(urlsplit(url).query)}
    assert taken == REDIS_URL_OPTIONS


def test_every_value_is_documented() -> None:
    """values.yaml documented line by line: each key has a comment line right above it."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented = []
    item_indent: int | None = None  # inside a list item's body (example data, not a value key)
    for number, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if line.lstrip().startswith("- "):
            item_indent = indent if item_indent is None else min(item_indent, indent)
            continue
        if not line.strip() or (item_indent is not None and indent > item_indent):
            continue
        item_indent = None
        if re.match(r"^\s*[A-Za-z][\w.-]*:", line) and not lines[number - 1].lstrip().startswith("#"):
            undocumented.append(f"{number + 1}: {line.strip()}")
    assert undocumented == []


def test_schema_covers_every_value() -> None:
    """Each key of values.yaml is declared in the schema (which forbids unknown keys)."""

    def walk(values: dict[str, Any], schema: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, value in values.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None:
                missing.append(path + key)
            elif isinstance(value, dict) and "properties" in sub:
                missing += walk(value, sub, f"{path}{key}.")
        return missing

    assert walk(DEFAULTS, SCHEMA, "") == []


# --- Helm, through helm-sdkpy in its own venv ----------------------------------------------------------
def find_python312() -> str | None:
    """A Python >= 3.12 interpreter: $HELM_PYTHON, python3.12 on PATH, or a pyenv install."""
    candidates = [os.environ.get("HELM_PYTHON"), shutil.which("python3.12"), shutil.which("python3.13")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3.1[2-9]")))
    for candidate in filter(None, candidates):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; raise SystemExit(sys.version_info < (3, 12))"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except OSError:
            continue
        if probe.returncode == 0:  # a pyenv shim without that version exits non-zero
            return candidate
    return None


def ensure_helm_venv() -> Path:
    """``.venv-helm`` with helm-sdkpy, (re)made when missing or older than requirements-helm.lock."""
    python = HELM_VENV / "bin" / "python"
    if HELM_STAMP.exists() and HELM_STAMP.stat().st_mtime >= HELM_LOCK.stat().st_mtime and python.exists():
        return python
    interpreter = find_python312()
    if interpreter is None:
        service_missing("Python >= 3.12 (helm-sdkpy needs it; set HELM_PYTHON or install python3.12)")
    subprocess.run([interpreter, "-m", "venv", "--clear", str(HELM_VENV)], check=True, timeout=120)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(HELM_LOCK)],
        check=True,
        timeout=600,
    )
    HELM_STAMP.touch()
    return python


_CORE = {"configmaps": "ConfigMap", "secrets": "Secret", "services": "Service"}
_CORE |= {"serviceaccounts": "ServiceAccount", "persistentvolumeclaims": "PersistentVolumeClaim"}
_GROUPS = {
    "v1": _CORE,
    "apps/v1": {"deployments": "Deployment"},
    "policy/v1": {"poddisruptionbudgets": "PodDisruptionBudget"},
    "autoscaling/v2": {"horizontalpodautoscalers": "HorizontalPodAutoscaler"},
    "networking.k8s.io/v1": {"networkpolicies": "NetworkPolicy"},
    "monitoring.coreos.com/v1": {"servicemonitors": "ServiceMonitor"},
    "keda.sh/v1alpha1": {"scaledobjects": "ScaledObject", "triggerauthentications": "TriggerAuthentication"},
}


class _StandInApi(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API for ``helm install``: discovery, nothing exists, accept all."""

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        if path == "/api":
            return self._send(
                200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
            )
        if path == "/apis":
            groups = [
                {
                    "name": gv.split("/")[0],
                    "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                    "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]},
                }
                for gv in _GROUPS
                if gv != "v1"
            ]
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        group_version = "v1" if path == "/api/v1" else path.removeprefix("/apis/")
        if group_version in _GROUPS:
            resources = [
                {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind, "verbs": ["*"]}
                for name, kind in _GROUPS[group_version].items()
            ]
            return self._send(
                200, {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources}
            )
        if path.endswith("/secrets"):  # Helm's release history: none
            return self._send(200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "reason": "NotFound", "code": 404})

    def _accept(self, code: int) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if "json" in self.headers.get("Content-Type", ""):
            body = json.loads(raw)
        else:  # Helm's release record travels as protobuf; its content does not matter here
            body = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}
        body.setdefault("metadata", {})["resourceVersion"] = "1"
        self._send(code, body)

    def do_POST(self) -> None:
        self._accept(201)

    def do_PUT(self) -> None:
        self._accept(200)

    do_PATCH = do_PUT


_DRIVER = r"""
import asyncio, json, sys
import helm_sdkpy as helm

job = json.load(sys.stdin)
config = helm.Configuration(namespace="default", kubeconfig=job["kubeconfig"])
out = {}
for name, chart in job["lint"].items():
    result = asyncio.run(helm.Lint(config).run(chart))
    out["lint:" + name] = [[m["Severity"], m["Path"]] for m in result.get("Messages") or []]
for name, values in job["render"].items():
    try:
        release = asyncio.run(helm.Install(config).run(
            job["releases"].get(name, "coc"), job["chart"], values=values or None, wait=False, timeout=30))
        out[name] = {"manifest": release["manifest"], "notes": release.get("info", {}).get("notes", "")}
    except helm.HelmError as exc:
        out[name] = {"error": str(exc)}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def stand_in_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandInApi)
    thread = threading.Thread(target=server.serve_forever, name="stand-in-kube-api", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def helm_results(stand_in_api: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lint (the minimal and the full values) and render every GOOD and BAD case in one helm-sdkpy run."""
    python = ensure_helm_venv()
    linted: dict[str, str] = {}
    for name, values in (("minimal", MINIMAL), ("full", FULL)):
        # `helm lint -f ci/<name>-values.yaml`, as the SDK lints a path only (the bare defaults fail:
        # the chart requires what the worker cannot start without)
        chart = tmp_path_factory.mktemp(name) / CHART.name
        shutil.copytree(CHART, chart)
        (chart / "values.yaml").write_text(yaml.safe_dump(merged(DEFAULTS, values)), encoding="utf-8")
        linted[name] = str(chart)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": stand_in_api}}],
        "users": [{"name": "stand-in", "user": {"token": "unused"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "stand-in"}}],
        "current-context": "stand-in",
    }
    job = {
        "kubeconfig": yaml.safe_dump(kubeconfig),
        "chart": str(CHART),
        "lint": linted,
        "render": {**GOOD, **{f"bad:{name}": values for name, (values, _) in BAD.items()}},
        "releases": RELEASE_NAMES,
    }
    proc = subprocess.run(
        [str(python), "-c", _DRIVER],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, Any] = json.loads(proc.stdout)
    return results


def manifests(results: dict[str, Any], case: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects of one case, by (kind, name)."""
    result = results[case]
    assert "error" not in result, result.get("error")
    docs = [d for d in yaml.safe_load_all(result["manifest"]) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def one(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for (k, _), obj in objects.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: dict[tuple[str, str], dict[str, Any]]) -> set[str]:
    return {kind for kind, _ in objects}


def worker_env(objects: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """Every COC_WORKER_* variable the pod gets: the ConfigMap (envFrom) plus the container's env."""
    deployment = one(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    config = one(objects, "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    env: dict[str, Any] = dict(config["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def test_helm_lint_is_clean(helm_results: dict[str, Any]) -> None:
    """No warning or error (severity >= 2) with the least values nor with every feature on."""
    for name in ("minimal", "full"):
        messages = helm_results["lint:" + name]
        assert [m for m in messages if m[0] >= 2] == [], f"helm lint ({name} values): {messages}"


@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_values_render(helm_results: dict[str, Any], case: str) -> None:
    objects = manifests(helm_results, case)
    assert {"Deployment", "ConfigMap", "Service"} <= kinds(objects)


@pytest.mark.parametrize("case", sorted(BAD))
def test_helm_rejects_bad_values(helm_results: dict[str, Any], case: str) -> None:
    result = helm_results[f"bad:{case}"]
    assert "error" in result, f"{case} rendered"
    assert BAD[case][1] in result["error"], result["error"]


def test_default_render(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "default")
    assert kinds(objects) == {
        "Deployment",
        "ConfigMap",
        "Secret",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
    }
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == DEFAULTS["replicaCount"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    chart = load_yaml(CHART / "Chart.yaml")
    assert container["image"] == f"{DEFAULTS['image']['repository']}:{chart['appVersion']}"
    env = worker_env(objects)
    # The sqlite file lives on the /data volume, as in the image (Dockerfile: VOLUME /data).
    assert env["COC_WORKER_DEDUP_URL"] == "sqlite:////data/dedup.sqlite3"
    assert env["COC_WORKER_HTTP_HOST"] == "0.0.0.0"  # worker.httpHost: "::" on an IPv6-only cluster
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/data"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert {"COC_WORKER_API_AK_FILE", "COC_WORKER_API_SK_FILE"} <= set(env)
    assert "COC_WORKER_API_TOKEN_FILE" not in env
    assert "COC_WORKER_API_MAX_CONNECTIONS" not in env  # unset: the worker uses max_in_flight
    # What the worker cannot start without is refused at render time (BAD), not left to a warning
    # in NOTES.txt: the defaults alone do not render.
    assert merged(DEFAULTS, BAD["chart_defaults"][0]) == DEFAULTS
    assert "WARNING" not in helm_results["default"]["notes"]


def test_the_notes_say_when_the_dedup_store_dies_with_the_pod(helm_results: dict[str, Any]) -> None:
    """The defaults keep the sqlite file on an emptyDir: a job in hand when the pod is replaced is
    sent again by the next pod as if new (an on-call review saw five applied events come out
    "rejected"). Said at install, and not when the store outlives the pod."""
    assert "lost with the pod" in helm_results["default"]["notes"]
    # and that an emptyDir outgrown by the sqlite file gets the pod evicted, with the sizing rule
    notes = " ".join(helm_results["default"]["notes"].split())
    assert "sizeLimit (1Gi) as ~330-430 bytes x events/s x ttlS + 64 MiB" in notes
    assert "evicts the pod with a 1-second grace: no drain, no final commit" in notes
    for case in GOOD:
        values = GOOD[case]
        dedup = values.get("dedup", {}).get("backend", "sqlite")
        on_pvc = values.get("persistence", {}).get("type", "emptyDir") == "pvc"
        assert ("lost with the pod" in helm_results[case]["notes"]) == (dedup == "sqlite" and not on_pvc), (
            case
        )


def test_rolling_updates_only_with_a_shared_dedup_store(helm_results: dict[str, Any]) -> None:
    """A rolling update runs the old and the new pod together, the partitions moving between them:
    with each pod's own sqlite file the new one did not know what the old one had in hand."""
    strategy = one(manifests(helm_results, "default"), "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "Recreate"
    strategy = one(manifests(helm_results, "aksk_endpoint_hpa"), "Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"


def test_hard_anti_affinity_rolls_without_a_surge_pod(helm_results: dict[str, Any]) -> None:
    """``podAntiAffinity: hard`` with the fixed maxSurge 1 / maxUnavailable 0: with as many replicas
    as schedulable nodes the surge pod stayed Pending and the rollout never ended. With a required
    anti-affinity (the preset or the user's own) the chart now stops a pod before its replacement
    starts; the rolling update is configurable (updateStrategy), and Recreate stays where it was."""

    def rolling(case: str) -> dict[str, Any]:
        strategy = one(manifests(helm_results, case), "Deployment")["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", case
        found: dict[str, Any] = strategy["rollingUpdate"]
        return found

    assert rolling("aksk_endpoint_hpa") == {"maxSurge": 0, "maxUnavailable": 1}  # podAntiAffinity: hard
    assert rolling("required_anti_affinity_in_affinity") == {"maxSurge": 0, "maxUnavailable": 1}
    assert rolling("redis_password_secret") == {"maxSurge": 1, "maxUnavailable": 0}  # soft: as before
    assert rolling("update_strategy_given") == {"maxSurge": "25%", "maxUnavailable": 0}
    assert rolling("update_strategy_given_with_hard_anti_affinity") == {"maxSurge": 1, "maxUnavailable": 1}
    for case in ("default", "existing_secret_pvc", "keda_scale_to_zero_sqlite_on_a_pvc"):
        assert one(manifests(helm_results, case), "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert DEFAULTS["updateStrategy"] == {"maxSurge": None, "maxUnavailable": None}


def test_labels_are_strings_whatever_the_release_is_named(helm_results: dict[str, Any]) -> None:
    """A release named ``2024`` or ``true`` rendered ``app.kubernetes.io/instance: 2024``, a number
    to YAML, and the API server refused every object (label values are strings)."""
    for case, name in RELEASE_NAMES.items():
        objects = manifests(helm_results, case)
        for (kind, _), obj in objects.items():
            assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == name, (case, kind)
        deployment = one(objects, "Deployment")
        for labels in (
            deployment["spec"]["selector"]["matchLabels"],
            deployment["spec"]["template"]["metadata"]["labels"],
        ):
            assert all(isinstance(value, str) for value in labels.values()), (case, labels)
        assert deployment["metadata"]["name"] == f"{name}-coc-change-worker"


def test_the_readme_ingress_deployment_is_hardened_as_the_chart(helm_results: dict[str, Any]) -> None:
    """The README's standalone ``coc-worker ingest`` Deployment ran as the image's user with a
    writable root, every capability, no resources and the probes' 1 s default timeout: it now
    carries the chart's pod hardening, resources and probe timeouts."""
    chart_pod = one(manifests(helm_results, "default"), "Deployment")["spec"]["template"]["spec"]
    chart_container = chart_pod["containers"][0]
    pod = readme_ingress_deployment((ROOT / "README.md").read_text(encoding="utf-8"))["spec"]["template"][
        "spec"
    ]
    (container,) = pod["containers"]
    assert pod["securityContext"] == chart_pod["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == chart_container["securityContext"]
    assert container["resources"]["requests"].keys() == {"cpu", "memory"}
    assert container["resources"]["limits"].keys() == {"memory"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] == chart_container[probe]["timeoutSeconds"], probe
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}  # a read-only root: /tmp its only writable path


def test_api_request_limit_is_passed_only_when_set(helm_results: dict[str, Any]) -> None:
    env = worker_env(manifests(helm_results, "full"))
    assert env["COC_WORKER_API_MAX_CONNECTIONS"] == str(FULL["api"]["maxConnections"])
    assert env["COC_WORKER_MAX_IN_FLIGHT"] == str(FULL["worker"]["maxInFlight"])


def test_pod_is_hardened(helm_results: dict[str, Any]) -> None:
    for case in GOOD:
        pod = one(manifests(helm_results, case), "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"].get("runAsUser", 1) > 0  # absent: the platform assigns one
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        security = pod["containers"][0]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        writable = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/data", "/tmp"}


def test_pod_identity_is_left_to_the_platform_when_null(helm_results: dict[str, Any]) -> None:
    """OpenShift's restricted-v2 SCC refused the pod: the chart always named UID, GID and fsGroup
    10001, outside the namespace's range, and the schema took no null to leave them out."""
    default = one(manifests(helm_results, "default"), "Deployment")["spec"]["template"]["spec"]
    assert {k: default["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == {
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
    }
    deployment = one(manifests(helm_results, "platform_assigns_the_pod_identity"), "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_pods_carry_the_selector_labels(helm_results: dict[str, Any]) -> None:
    """``podLabels`` naming a selector label made a second key in the pod template (the later won),
    and the Deployment's pods no longer matched its selector: the chart now refuses it (BAD)."""
    for case in GOOD:
        deployment = one(manifests(helm_results, case), "Deployment")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), case
    template = one(manifests(helm_results, "aksk_endpoint_hpa"), "Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "payments"  # any other label is the user's


def test_chart_made_secrets_are_checked_without_showing_them(helm_results: dict[str, Any]) -> None:
    """The chart wrote any secret into its Secret, and the worker refused a short one at start (or
    had none to read): the render fails instead, naming the key and never the value."""
    for case, (values, _) in BAD.items():
        error = helm_results[f"bad:{case}"]["error"]
        for key in ("apiAk", "apiSk", "apiToken", "kafkaSaslPassword", "kafkaSslKeyPassword"):
            value = values["secrets"].get(key, "").strip()
            if value:
                assert value not in error, case
    for case in BAD:  # nor a URL's password in a field that takes none
        assert "S3cret-in-values" not in helm_results[f"bad:{case}"]["error"], case
    objects = manifests(helm_results, "secrets_of_the_least_length")
    data = one(objects, "Secret")["data"]
    written = {base64.b64decode(v).decode() for v in data.values()}
    assert written == {"t" * MIN_SECRET_CHARS, "é" * MIN_SECRET_CHARS}


def test_probes_and_grace_period(helm_results: dict[str, Any]) -> None:
    for case in GOOD:
        objects = manifests(helm_results, case)
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = worker_env(objects)
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
        assert port == int(env["COC_WORKER_HTTP_PORT"])
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        grace = float(env["COC_WORKER_SHUTDOWN_GRACE_S"])
        # the grace, then the shutdown's worst case after it (values.yaml terminationGraceExtraS):
        # ~0.5 s drain overrun, 5 s closing the lanes, 3 broker steps of 5 s, ~2 s handing on the
        # claims, ~2 s stopping the HTTP server
        assert pod["terminationGracePeriodSeconds"] >= math.ceil(grace) + 0.5 + 5 + 3 * 5 + 2 + 2, case
    full_pod = one(manifests(helm_results, "full"), "Deployment")["spec"]["template"]["spec"]
    assert (
        full_pod["terminationGracePeriodSeconds"] == 43 + 20 + DEFAULTS["terminationGraceExtraS"]
    )  # ceil(42.5)


def test_checksums_roll_pods_on_change(helm_results: dict[str, Any]) -> None:
    def annotations(case: str) -> dict[str, str]:
        deployment = one(manifests(helm_results, case), "Deployment")
        found: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
        return found

    base = annotations("full")
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", base["checksum/secret"])
    config_changed = annotations("full_config_changed")
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secret"] == base["checksum/secret"]
    secret_changed = annotations("full_secret_changed")
    assert secret_changed["checksum/secret"] != base["checksum/secret"]
    assert secret_changed["checksum/config"] == base["checksum/config"]
    assert "checksum/secret" not in annotations("existing_secret_pvc")  # not the chart's to hash


def test_secrets_are_files_wired_by_file_env(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "full")
    env = worker_env(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    secret = one(objects, "Secret")
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "credentials")
    assert mount["readOnly"] is True
    assert "subPath" not in mount  # a rotated Secret reaches the files
    files = {item["path"]: item["key"] for item in volume["secret"]["items"]}
    file_envs = {k: v for k, v in env.items() if k.endswith("_FILE")}
    assert set(file_envs) == {
        "COC_WORKER_API_TOKEN_FILE",
        "COC_WORKER_KAFKA_SASL_PASSWORD_FILE",
        "COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE",
    }
    given = {
        "COC_WORKER_API_TOKEN_FILE": "test-token-value",
        "COC_WORKER_KAFKA_SASL_PASSWORD_FILE": "test-sasl-password",
        "COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE": "test-key-password",
    }
    for name, path in file_envs.items():
        directory, _, filename = path.rpartition("/")
        assert directory == mount["mountPath"]
        key = files[filename]
        assert base64.b64decode(secret["data"][key]).decode() == given[name]
    # The Redis URL carries a password: it comes from the Secret, and no secret is in the ConfigMap.
    ref = env["COC_WORKER_DEDUP_URL"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == FULL["secrets"]["redisUrl"]
    config_text = json.dumps(one(objects, "ConfigMap")["data"])
    for value in FULL["secrets"].values():
        assert value not in config_text
    # Private CA for the brokers: mounted, and its path is the configured file.
    ca_mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-ca")
    assert env["COC_WORKER_KAFKA_SSL_CAFILE"] == ca_mount["mountPath"] + "/ca.crt"


def test_redis_tls_files_are_mounted_where_the_url_names_them(helm_results: dict[str, Any]) -> None:
    """A rediss:// URL naming a private CA: without the Secret mounted the worker refused to start
    ('names no readable file'), and the chart had no way to mount one."""
    pod = one(manifests(helm_results, "redis_tls"), "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "redis-tls")
    volume = next(v for v in pod["volumes"] if v["name"] == "redis-tls")
    assert volume["secret"]["secretName"] == "redis-tls-files"
    assert "items" not in volume["secret"]  # every key, so the URL may name any of them
    url = GOOD["redis_tls"]["dedup"]["redis"]["url"]
    ca_path = parse_qs(urlsplit(url).query)["ssl_ca_certs"][0]
    assert ca_path.rpartition("/")[0] == mount["mountPath"]
    default = one(manifests(helm_results, "default"), "Deployment")["spec"]["template"]["spec"]
    assert "redis-tls" not in {v["name"] for v in default["volumes"]}


def test_existing_secret_is_used_as_is(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "existing_secret_pvc")
    assert "Secret" not in kinds(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "credentials")
    assert volume["secret"]["secretName"] == "coc-worker-credentials"
    assert {i["key"] for i in volume["secret"]["items"]} == {"api-ak", "api-sk", "kafka-sasl-password"}
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one RWO claim
    claim = one(objects, "PersistentVolumeClaim")
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert one(objects, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",  # all pods are unready while the API is down
        "selector": deployment["spec"]["selector"],
    }
    assert (
        one(manifests(helm_results, "pdb_min_available_below_the_replicas"), "PodDisruptionBudget")["spec"][
            "minAvailable"
        ]
        == 2
    )


def test_keda_scales_on_lag_within_partitions(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "full")
    env = worker_env(objects)
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    scaled = one(objects, "ScaledObject")
    partitions = FULL["kafka"]["inputTopicPartitions"]
    assert scaled["spec"]["maxReplicaCount"] == partitions  # 0 in values = the partition count
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == env["COC_WORKER_KAFKA_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == env["COC_WORKER_GROUP_ID"]
    assert meta["topic"] == env["COC_WORKER_INPUT_TOPIC"]
    assert meta["allowIdleConsumers"] == "false"
    # Lag of a group without a committed offset counts from where the worker then starts reading.
    consumer = (ROOT / "worker" / "consumer.py").read_text(encoding="utf-8")
    assert re.findall(r'auto_offset_reset="(\w+)"', consumer) == ["earliest"]
    assert meta["offsetResetPolicy"] == "earliest"
    assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
    auth = one(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    secret = one(objects, "Secret")
    assert refs["password"]["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][refs["password"]["key"]]).decode() == "test-sasl-password"
    assert refs["ca"]["name"] == FULL["kafka"]["ssl"]["caSecret"]["name"]
    client = FULL["kafka"]["ssl"]["clientSecret"]
    assert (refs["cert"]["name"], refs["cert"]["key"]) == (
        client["name"],
        DEFAULTS["kafka"]["ssl"]["clientSecret"]["certKey"],
    )
    assert (refs["key"]["name"], refs["key"]["key"]) == (
        client["name"],
        DEFAULTS["kafka"]["ssl"]["clientSecret"]["keyKey"],
    )
    assert base64.b64decode(secret["data"][refs["keyPassword"]["key"]]).decode() == "test-key-password"
    (username,) = auth["spec"]["env"]
    assert username["name"] in env
    assert username["containerName"] == "worker"
    assert "HorizontalPodAutoscaler" not in kinds(objects)


def test_keda_counts_lag_from_the_earliest_offset_whatever_an_old_values_file_says(
    helm_results: dict[str, Any],
) -> None:
    """``offsetResetPolicy`` was a value until the chart always counted from the earliest offset
    (where the worker starts); a values file that still sets it failed every upgrade."""
    (trigger,) = one(manifests(helm_results, "keda_old_offset_reset_policy"), "ScaledObject")["spec"][
        "triggers"
    ]
    assert trigger["metadata"]["offsetResetPolicy"] == "earliest"


def test_keda_lag_threshold_is_above_what_a_pod_holds(helm_results: dict[str, Any]) -> None:
    """The worker commits its lowest unfinished offset, so a pod's buffer (maxBuffered, 4 x
    maxInFlight by default) counts as lag: the default threshold of 100 made one busy pod look like
    ten pods' backlog, and KEDA added pods (each a group-wide rebalance) every polling interval."""
    keda = DEFAULTS["autoscaling"]["keda"]
    worker = DEFAULTS["worker"]
    default_buffer = worker["maxBuffered"] or 4 * worker["maxInFlight"]
    assert keda["lagThreshold"] >= default_buffer
    assert keda["scaleUpStabilizationS"] >= 60
    scaled = one(manifests(helm_results, "msk_client_certificate_keda"), "ScaledObject")  # the defaults
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["lagThreshold"] == str(keda["lagThreshold"])
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": keda["scaleUpStabilizationS"]}
    assert behavior["scaleDown"] == {"stabilizationWindowSeconds": keda["scaleDownStabilizationS"]}
    for case in GOOD:  # the examples too (ci/full-values.yaml, the README's)
        values = merged(DEFAULTS, GOOD[case])
        if values["autoscaling"]["keda"]["enabled"]:
            buffer = values["worker"]["maxBuffered"] or 4 * values["worker"]["maxInFlight"]
            (trigger,) = one(manifests(helm_results, case), "ScaledObject")["spec"]["triggers"]
            assert int(trigger["metadata"]["lagThreshold"]) >= buffer, case


def test_keda_may_scale_to_zero(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "keda_scale_to_zero")
    assert one(objects, "ScaledObject")["spec"]["minReplicaCount"] == 0
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_redis_url_options_reach_the_worker(helm_results: dict[str, Any]) -> None:
    env = worker_env(manifests(helm_results, "redis_url_with_options"))
    assert env["COC_WORKER_DEDUP_URL"] == "redis://redis-master:6379/0?db=1&prefix=x"
    assert env["COC_WORKER_DEDUP_REDIS_MIN_REPLICAS"] == "1"


def test_the_redis_password_comes_from_its_own_secret(helm_results: dict[str, Any]) -> None:
    """A Redis of another chart keeps only its password in a Secret (Bitnami's ``redis-password``):
    the chart could read a whole URL from a Secret key only, and such a release needed a URL
    Secret made by hand. The password reaches the worker as a file mounted from that Secret: not
    the ConfigMap, and not the environment (an env var from a secretKeyRef shows in `kubectl exec
    env` and /proc/<pid>/environ), as every other secret of the chart."""
    objects = manifests(helm_results, "redis_password_secret")
    env = worker_env(objects)
    assert env["COC_WORKER_DEDUP_URL"] == "redis://redis-master.data:6379/0"  # the ConfigMap's
    assert "COC_WORKER_DEDUP_REDIS_PASSWORD" not in env
    path = env["COC_WORKER_DEDUP_REDIS_PASSWORD_FILE"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "redis-password"]
    assert volume["secret"]["secretName"] == "redis"
    assert volume["secret"]["items"] == [{"key": "redis-password", "path": "password"}]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "redis-password"]
    assert (mount["readOnly"], f"{mount['mountPath']}/password") == (True, path)
    config = one(objects, "ConfigMap")["data"]
    assert not [name for name in config if "PASSWORD" in name]
    secret = one(objects, "Secret")  # the chart's own holds no Redis key: the password is not its
    assert set(secret["data"]) == {DEFAULTS["secrets"]["keys"]["apiAk"], DEFAULTS["secrets"]["keys"]["apiSk"]}
    assert one(objects, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"  # Redis shared


def test_settings_added_since_the_last_release_are_rendered_only_when_set(
    helm_results: dict[str, Any],
) -> None:
    """The worker refuses a setting it does not know, and a rollout or a rollback runs pods of the
    release before on the new ConfigMap: a variable that release lacks crash-looped them. Left at
    their defaults, such settings are not rendered (the worker's own default applies)."""
    default = worker_env(manifests(helm_results, "redis_url_with_options"))
    assert "COC_WORKER_DEDUP_FORGOTTEN_WINDOW_S" not in default
    assert "COC_WORKER_MAX_BUFFERED_BYTES" not in default
    for name in ("CERTFILE", "KEYFILE", "KEY_PASSWORD_FILE"):
        assert f"COC_WORKER_KAFKA_SSL_{name}" not in default
    for case in GOOD:  # the Redis password's Secret: only when named
        named = merged(DEFAULTS, GOOD[case])["dedup"]["redis"]["passwordSecret"]["name"]
        rendered = "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE" in worker_env(manifests(helm_results, case))
        assert rendered is bool(named), case
    assert (
        worker_env(manifests(helm_results, "redis_forgotten_window_off"))[
            "COC_WORKER_DEDUP_FORGOTTEN_WINDOW_S"
        ]
        == "0"
    )


def test_hpa_within_partitions(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "aksk_endpoint_hpa")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] <= DEFAULTS["kafka"]["inputTopicPartitions"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(objects, "Deployment")["spec"]
    env = worker_env(objects)
    assert env["COC_WORKER_DEDUP_URL"] == "redis://redis-master:6379/0"  # no password: plain config
    assert env["COC_WORKER_TOPIC_PARTITIONS"] == str(DEFAULTS["kafka"]["inputTopicPartitions"])


def test_service_and_service_monitor(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "full")
    service = one(objects, "Service")
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_network_policy_allows_only_dependencies(helm_results: dict[str, Any]) -> None:
    objects = manifests(helm_results, "full")
    policy = one(objects, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress = policy["spec"]["egress"]
    by_port = {(p["port"], p["protocol"]): rule["to"] for rule in egress for p in rule["ports"]}
    assert set(by_port) == {(53, "UDP"), (53, "TCP"), (9093, "TCP"), (443, "TCP"), (6379, "TCP")}
    net = FULL["networkPolicy"]
    assert by_port[(9093, "TCP")] == net["kafka"]["peers"]
    assert by_port[(443, "TCP")] == net["api"]["peers"]
    assert by_port[(6379, "TCP")] == net["redis"]["peers"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"] == net["metricsFrom"]
    assert "NetworkPolicy" not in kinds(manifests(helm_results, "aksk_endpoint_hpa"))


def test_network_policy_opens_the_ports_of_the_endpoints(helm_results: dict[str, Any]) -> None:
    """The egress ports were never compared with the endpoints: brokers on 9093, an API on 8443 or
    a Redis on 6380 rendered with the default ports, and the pod could reach none of them (a crash
    loop). The chart refuses that now (BAD); with the ports listed, each rule opens them."""
    policy = one(manifests(helm_results, "network_policy_with_the_endpoints_ports"), "NetworkPolicy")
    ports = [
        sorted(p["port"] for p in rule["ports"] if p["protocol"] == "TCP")
        for rule in policy["spec"]["egress"]
    ]
    assert ports == [[53], [9093, 9094], [8443], [6380]]  # DNS, Kafka, the API, Redis
    proxied = one(manifests(helm_results, "network_policy_api_through_a_proxy"), "NetworkPolicy")
    assert [p["port"] for p in proxied["spec"]["egress"][2]["ports"]] == [3128]
    # the DNS default fits kube-dns only: values.yaml says what NodeLocal DNSCache and OpenShift need
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    for needed in ("NodeLocal DNSCache", "openshift-dns", "5353"):
        assert needed in text


def test_a_client_certificate_is_mounted_and_passed_to_the_worker_and_keda(
    helm_results: dict[str, Any],
) -> None:
    """Strimzi's ``tls`` users (mTLS) and MSK's TLS client authentication: the chart had no way to
    give the worker, nor KEDA's lag scaler, a client certificate."""
    objects = manifests(helm_results, "strimzi_tls_user")
    env = worker_env(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-client")
    assert mount == {"name": "kafka-client", "mountPath": "/etc/coc-worker/kafka-client", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "kafka-client")["secret"]
    assert volume["secretName"] == "coc-worker"
    assert volume["defaultMode"] == 0o440  # a private key: the pod's group only, as the credentials
    files = {item["path"]: item["key"] for item in volume["items"]}
    assert files == {"client.crt": "user.crt", "client.key": "user.key"}  # Strimzi's key names
    assert env["COC_WORKER_KAFKA_SSL_CERTFILE"] == mount["mountPath"] + "/client.crt"
    assert env["COC_WORKER_KAFKA_SSL_KEYFILE"] == mount["mountPath"] + "/client.key"
    assert "COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE" not in env  # Strimzi's key is not encrypted

    # KEDA's scaler connects as the worker does: with the certificate alone (no SASL, no CA Secret)
    # it needs a TriggerAuthentication too
    objects = manifests(helm_results, "msk_client_certificate_keda")
    env = worker_env(objects)
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    auth = one(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert trigger["metadata"]["tls"] == "enable"
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "cert": ("coc-worker-msk-client", "client.pem"),
        "key": ("coc-worker-msk-client", "client-key.pem"),
        "keyPassword": ("coc-worker-credentials", "kafka-ssl-key-password"),
    }
    credentials = next(
        v
        for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "credentials"
    )
    password_file = {i["key"]: i["path"] for i in credentials["secret"]["items"]}["kafka-ssl-key-password"]
    assert env["COC_WORKER_KAFKA_SSL_KEY_PASSWORD_FILE"] == f"/etc/coc-worker/secrets/{password_file}"


def test_without_a_client_certificate_nothing_of_it_is_rendered(helm_results: dict[str, Any]) -> None:
    """Unset, no variable (a pod of the release before would refuse it during a rollout), no
    volume, no KEDA parameter and no Secret key."""
    for case, values in GOOD.items():
        if merged(DEFAULTS, values)["kafka"]["ssl"]["clientSecret"]["name"]:
            continue
        objects = manifests(helm_results, case)
        env = worker_env(objects)
        assert not {
            n for n in env if n.startswith(("COC_WORKER_KAFKA_SSL_CERT", "COC_WORKER_KAFKA_SSL_KEY"))
        }, case
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert "kafka-client" not in {v["name"] for v in pod["volumes"]}, case
        for (kind, _), obj in objects.items():
            if kind == "TriggerAuthentication":
                parameters = {r["parameter"] for r in obj["spec"]["secretTargetRef"]}
                assert not parameters & {"cert", "key", "keyPassword"}, case
            if kind == "Secret":
                assert DEFAULTS["secrets"]["keys"]["kafkaSslKeyPassword"] not in obj["data"], case


# --- drift between the chart and the worker's settings ---------------------------------------------------
def test_chart_sets_only_real_settings(helm_results: dict[str, Any]) -> None:
    fields = set(WorkerSettings.model_fields)
    for case in GOOD:
        names = [n for n in worker_env(manifests(helm_results, case)) if n.startswith("COC_WORKER_")]
        unknown = [n for n in names if n.removeprefix("COC_WORKER_").lower() not in fields]
        assert unknown == [], f"{case}: not WorkerSettings fields: {unknown}"


def test_documented_contract_is_configurable(helm_results: dict[str, Any]) -> None:
    reachable: set[str] = set()
    for case in GOOD:
        reachable |= set(worker_env(manifests(helm_results, case)))
    secrets = {name.upper() for name in SECRET_FIELDS}
    missing = []
    for setting in CONTRACT:
        name = f"COC_WORKER_{setting}"
        if setting in secrets:
            name += "_FILE"  # secrets only ever as mounted files
        if name not in reachable:
            missing.append(name)
    assert missing == []
    for case in GOOD:  # a secret never as a value: a mounted file, or an env var from a Secret
        env = worker_env(manifests(helm_results, case))
        for name in SECRET_FIELDS:
            value = env.get(f"COC_WORKER_{name.upper()}")
            assert value is None or set(value) == {"secretKeyRef"}, f"{case}: {name} as plain env"


#: Where the chart's defaults differ from the worker's on purpose (a cluster, not a laptop: the
#: broker's Service, the volume's sqlite file, JSON logs), or come from ci/minimal-values.yaml.
CHART_OWN_DEFAULTS = {
    f"COC_WORKER_{name}"
    for name in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "DEDUP_URL",
        "LOG_FORMAT",
        "API_REGION",
        "API_AK_FILE",
        "API_SK_FILE",
    )
}


def test_chart_defaults_are_the_workers(
    helm_results: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default tuned in the worker must reach the chart too: the chart's fetch wait stayed at
    100 ms after the worker's went to 20 (bench/README.md), and every install got the old one."""
    without_worker_env(monkeypatch)
    env = {n: v for n, v in worker_env(manifests(helm_results, "default")).items() if isinstance(v, str)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    chart = WorkerSettings()
    fields = WorkerSettings.model_fields
    differ = {
        name
        for name in env
        if (field := name.removeprefix("COC_WORKER_").lower()) in fields
        and getattr(chart, field) != fields[field].get_default(call_default_factory=True)
    }
    assert sorted(differ) == sorted(CHART_OWN_DEFAULTS)


@pytest.mark.parametrize("case", sorted(GOOD))
def test_rendered_config_is_accepted_by_the_worker(
    helm_results: dict[str, Any], case: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap as the worker reads it: WorkerSettings validates every value (types, ranges, rules)."""
    without_worker_env(monkeypatch)
    env = worker_env(manifests(helm_results, case))
    for name, value in env.items():
        if name == "COC_WORKER_DEDUP_REDIS_PASSWORD_FILE":  # mounted from a Secret of its own
            password = tmp_path / "redis-password"
            password.write_text("test-redis-password\n", encoding="utf-8")
            value = str(password)
        elif isinstance(value, dict):  # from the Secret (the README's existingSecret holds a rediss:// URL)
            value = merged(DEFAULTS, GOOD[case])["secrets"]["redisUrl"] or "rediss://redis:6379/0"
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert settings.shutdown_grace_s == float(env["COC_WORKER_SHUTDOWN_GRACE_S"])


if __name__ == "__main__":  # `make helm-venv`
    print(ensure_helm_venv(), file=sys.stderr)


def test_secret_names_and_keys_render_as_strings_whatever_they_look_like(
    helm_results: dict[str, Any],
) -> None:
    """A Secret named "true" or a key "123" rendered bare is a boolean or a number to YAML, and the
    API server refuses the manifest: every reference to a Secret is quoted."""
    objects = manifests(helm_results, "client_key_password_and_secret_names_not_strings")
    found: list[tuple[str, object]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for field in ("secretName", "secretKeyRef"):
                if field in node:
                    ref = node[field]
                    found.extend(
                        [(field, ref)]
                        if field == "secretName"
                        else [("name", ref["name"]), ("key", ref["key"])]
                    )
            if "items" in node and "secretName" in node:
                found.extend(("items.key", item["key"]) for item in node["items"])
            if "parameter" in node and "name" in node:  # KEDA's TriggerAuthentication
                found.extend([("name", node["name"]), ("key", node["key"])])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(list(objects.values()))
    assert ("secretName", "true") in found
    assert ("items.key", "123") in found
    assert ("secretName", "null") in found  # the Redis password's Secret, mounted
    assert ("items.key", "1") in found
    assert all(isinstance(value, str) for _, value in found), found
