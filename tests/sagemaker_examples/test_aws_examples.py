"""The AWS-only examples (deploy, ECR push, autoscaling) run their real SDK calls against botocore Stubbers.

No request leaves the machine: each stubbed client checks the operation order and validates every parameter
against the service model, so a wrong argument name or type fails here as it would in AWS.
"""

from __future__ import annotations

import ast
import base64
import datetime
import stat
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from sagemaker_examples import autoscaling, deploy_sdk_v2, deploy_sdk_v3, push_to_ecr

EXAMPLES = Path(deploy_sdk_v2.__file__).parent
IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm:1"
ROLE = "arn:aws:iam::111122223333:role/SageMakerRole"
WHEN = datetime.datetime(2026, 1, 1)


def boto_session() -> boto3.Session:
    return boto3.Session(region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")


def deploy_args(*extra: str):
    return deploy_sdk_v2.parse_args(["--image-uri", IMAGE, "--role", ROLE, "--endpoint-name", "llm-test", *extra])


def test_examples_import_nothing_from_the_project():
    for path in EXAMPLES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name.split(".")[0] not in ("serve", "model_handler", "tests", "bench"), f"{path.name}: {name}"


# ---- deploy with SDK v2 ------------------------------------------------------------------------------------


def test_v2_deploy_creates_model_config_and_endpoint_with_tgi_env():
    import sagemaker

    session = boto_session()
    sm_client = session.client("sagemaker")
    sm_session = sagemaker.Session(
        boto_session=session,
        sagemaker_client=sm_client,
        default_bucket="unused-bucket",
        sagemaker_config={},
    )
    # HuggingFaceModel resolves the session's default bucket even with no code to upload: one ListBuckets.
    with Stubber(sm_session.s3_resource.meta.client) as s3:
        s3.add_response("list_buckets", {"Buckets": [{"Name": "unused-bucket", "CreationDate": WHEN}]})
        with Stubber(sm_client) as sm:
            container = {
                "Image": IMAGE,
                "Environment": {
                    "HF_MODEL_ID": "org/model",
                    "SM_NUM_GPUS": "4",
                    "MESSAGES_API_ENABLED": "true",
                    "MAX_TOTAL_TOKENS": "4096",
                    "SAGEMAKER_PROGRAM": "",
                    "SAGEMAKER_SUBMIT_DIRECTORY": "",
                    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                    "SAGEMAKER_REGION": "us-east-1",
                },
            }
            sm.add_response(
                "create_model",
                {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/m"},
                {"ModelName": "llm-model", "ExecutionRoleArn": ROLE, "PrimaryContainer": container},
            )
            variant = {
                "ModelName": "llm-model",
                "VariantName": "AllTraffic",
                "InitialInstanceCount": 1,
                "InstanceType": "ml.g5.12xlarge",
                "InitialVariantWeight": 1,
                "ContainerStartupHealthCheckTimeoutInSeconds": 900,
                "InferenceAmiVersion": "al2023-ami-sagemaker-inference-gpu-4-1",
            }
            sm.add_response(
                "create_endpoint_config",
                {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:ec/c"},
                {"EndpointConfigName": "llm-test", "ProductionVariants": [variant]},
            )
            sm.add_response(
                "create_endpoint",
                {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/e"},
                {"EndpointName": "llm-test", "EndpointConfigName": "llm-test", "Tags": []},
            )
            args = deploy_args(
                "--model-id",
                "org/model",
                "--num-gpus",
                "4",
                "--instance-type",
                "ml.g5.12xlarge",
                "--env",
                "MAX_TOTAL_TOKENS=4096",
                "--model-name",
                "llm-model",
                "--no-wait",
                "--inference-ami-version",
                "al2023-ami-sagemaker-inference-gpu-4-1",
            )
            predictor = deploy_sdk_v2.deploy(args, session=sm_session)
            sm.assert_no_pending_responses()
    assert predictor.endpoint_name == "llm-test"
    # the predictor speaks JSON both ways, as TGI's does
    assert predictor.serializer.CONTENT_TYPE == "application/json"
    assert predictor.deserializer.ACCEPT == ("application/json",)


def test_v2_arguments_default_to_the_tgi_image_settings():
    args = deploy_args()
    assert deploy_sdk_v2.model_kwargs(args) == {
        "image_uri": IMAGE,
        "role": ROLE,
        "env": {"HF_MODEL_ID": "Qwen/Qwen2.5-1.5B-Instruct", "SM_NUM_GPUS": "1", "MESSAGES_API_ENABLED": "true"},
    }
    kwargs = deploy_sdk_v2.deploy_kwargs(args)
    assert kwargs["instance_type"] == "ml.g5.2xlarge" and kwargs["wait"] is True
    assert "inference_ami_version" not in kwargs


def test_v2_model_data_replaces_the_hub_id():
    kwargs = deploy_sdk_v2.model_kwargs(deploy_args("--model-id", "", "--model-data", "s3://bucket/model.tar.gz"))
    assert kwargs["model_data"] == "s3://bucket/model.tar.gz"
    assert "HF_MODEL_ID" not in kwargs["env"] and kwargs["env"]["MESSAGES_API_ENABLED"] == "true"


def test_v2_requires_image_and_role(capsys):
    with pytest.raises(SystemExit):
        deploy_sdk_v2.parse_args(["--image-uri", IMAGE])
    assert "--role" in capsys.readouterr().err


# ---- deploy with SDK v3 (arguments only: the test env pins sagemaker<3) -------------------------------------


def test_v3_builder_is_image_only_with_tgi_env():
    args = deploy_sdk_v3.parse_args(
        [
            "--image-uri",
            IMAGE,
            "--role",
            ROLE,
            "--num-gpus",
            "2",
            "--env",
            "MAX_INPUT_TOKENS=1024",
            "--endpoint-name",
            "llm-v3",
        ]
    )
    assert deploy_sdk_v3.builder_kwargs(args) == {
        "image_uri": IMAGE,
        "role_arn": ROLE,
        "instance_type": "ml.g5.2xlarge",
        "env_vars": {
            "HF_MODEL_ID": "Qwen/Qwen2.5-1.5B-Instruct",
            "SM_NUM_GPUS": "2",
            "MESSAGES_API_ENABLED": "true",
            "MAX_INPUT_TOKENS": "1024",
        },
    }
    assert deploy_sdk_v3.deploy_kwargs(args) == {
        "endpoint_name": "llm-v3",
        "initial_instance_count": 1,
        "container_timeout_in_seconds": 900,
        "wait": True,
    }


# ---- ECR push ----------------------------------------------------------------------------------------------


def ecr_client():
    return boto_session().client("ecr")


def test_ecr_creates_a_missing_repository():
    ecr = ecr_client()
    uri = "111122223333.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm"
    with Stubber(ecr) as stub:
        stub.add_client_error(
            "describe_repositories",
            "RepositoryNotFoundException",
            expected_params={"repositoryNames": ["sagemaker-llm"]},
        )
        stub.add_response(
            "create_repository",
            {"repository": {"repositoryUri": uri}},
            {"repositoryName": "sagemaker-llm", "imageScanningConfiguration": {"scanOnPush": True}},
        )
        assert push_to_ecr.ensure_repository(ecr, "sagemaker-llm") == uri
        stub.add_response("describe_repositories", {"repositories": [{"repositoryUri": uri}]})
        assert push_to_ecr.ensure_repository(ecr, "sagemaker-llm") == uri  # existing: no create


def test_ecr_login_then_tag_and_push():
    ecr = ecr_client()
    token = base64.b64encode(b"AWS:s3cret:with:colons").decode()
    with Stubber(ecr) as stub:
        stub.add_response(
            "get_authorization_token",
            {
                "authorizationData": [
                    {
                        "authorizationToken": token,
                        "proxyEndpoint": "https://111122223333.dkr.ecr.us-east-1.amazonaws.com",
                        "expiresAt": WHEN,
                    }
                ]
            },
            {},
        )
        login = push_to_ecr.registry_login(ecr)
    assert login == push_to_ecr.RegistryLogin(
        "111122223333.dkr.ecr.us-east-1.amazonaws.com", "AWS", "s3cret:with:colons"
    )
    remote = "111122223333.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm:v1"
    commands = push_to_ecr.push_commands("docker", "sagemaker-llm:latest", remote, login, Path("/src"))
    assert commands == [
        ["docker", "build", "--platform", "linux/amd64", "-t", "sagemaker-llm:latest", "/src"],
        ["docker", "login", "--username", "AWS", "--password-stdin", login.registry],
        ["docker", "tag", "sagemaker-llm:latest", remote],
        ["docker", "push", remote],
    ]
    assert all(login.password not in " ".join(command) for command in commands)


def test_ecr_password_goes_to_the_engine_on_stdin(tmp_path):
    # A stand-in engine executable that records what it was given (no container engine on this machine).
    record = tmp_path / "calls.txt"
    engine = tmp_path / "engine"
    engine.write_text(f'#!/bin/sh\necho "$* | $(cat)" >> {record}\n')
    engine.chmod(engine.stat().st_mode | stat.S_IXUSR)
    login = push_to_ecr.RegistryLogin("registry.example", "AWS", "pw123")
    commands = push_to_ecr.push_commands(str(engine), "local:1", "registry.example/repo:1", login)
    push_to_ecr.run_commands(commands, login.password)
    assert record.read_text().splitlines() == [
        "login --username AWS --password-stdin registry.example | pw123",
        "tag local:1 registry.example/repo:1 | ",
        "push registry.example/repo:1 | ",
    ]


# ---- autoscaling -------------------------------------------------------------------------------------------


def test_autoscaling_registers_target_and_tracking_policy():
    client = boto_session().client("application-autoscaling")
    target = autoscaling.scalable_target_request("llm-test", "AllTraffic", 1, 4)
    policy = autoscaling.scaling_policy_request("llm-test", "AllTraffic", 30)
    with Stubber(client) as stub:
        stub.add_response(
            "register_scalable_target",
            {},
            {
                "ServiceNamespace": "sagemaker",
                "ResourceId": "endpoint/llm-test/variant/AllTraffic",
                "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
                "MinCapacity": 1,
                "MaxCapacity": 4,
            },
        )
        stub.add_response(
            "put_scaling_policy",
            {"PolicyARN": "arn:aws:autoscaling:policy/p", "Alarms": []},
            {
                "PolicyName": "llm-test-invocations-per-instance",
                "ServiceNamespace": "sagemaker",
                "ResourceId": "endpoint/llm-test/variant/AllTraffic",
                "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
                "PolicyType": "TargetTrackingScaling",
                "TargetTrackingScalingPolicyConfiguration": {
                    "TargetValue": 30.0,
                    "ScaleInCooldown": 300,
                    "ScaleOutCooldown": 60,
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                },
            },
        )
        assert autoscaling.apply(client, target, policy) == "arn:aws:autoscaling:policy/p"
        stub.add_response("delete_scaling_policy", {})
        stub.add_response("deregister_scalable_target", {})
        autoscaling.remove(client, "llm-test", "AllTraffic")


def test_autoscaling_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min"):
        autoscaling.scalable_target_request("e", "AllTraffic", 3, 2)
    with pytest.raises(ValueError, match="target"):
        autoscaling.scaling_policy_request("e", "AllTraffic", 0)
