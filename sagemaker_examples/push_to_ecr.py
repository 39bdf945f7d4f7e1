"""Build the image and push it to Amazon ECR, where SageMaker pulls it from (it cannot pull from Docker Hub).

    python push_to_ecr.py --build --repository sagemaker-llm --tag latest     # docker build + login + tag + push
    python push_to_ecr.py --local-image localhost/sagemaker-llm:local --engine podman
    python push_to_ecr.py ... --dry-run                                       # print the commands only

Creates the repository when it is missing. The registry password goes to `docker login` on stdin, never in argv.
Prints the image URI to pass to deploy_sdk_v2.py / deploy_sdk_v3.py (--image-uri).
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RegistryLogin:
    registry: str  # host name, e.g. 111122223333.dkr.ecr.us-east-1.amazonaws.com
    username: str
    password: str


def ensure_repository(ecr, name: str) -> str:
    """The repository's URI, creating the repository (scan on push) when it does not exist."""
    try:
        return ecr.describe_repositories(repositoryNames=[name])["repositories"][0]["repositoryUri"]
    except ecr.exceptions.RepositoryNotFoundException:
        created = ecr.create_repository(repositoryName=name, imageScanningConfiguration={"scanOnPush": True})
        return created["repository"]["repositoryUri"]


def registry_login(ecr) -> RegistryLogin:
    """Docker credentials from ECR's authorization token (base64 of `AWS:<password>`, valid 12 hours)."""
    data = ecr.get_authorization_token()["authorizationData"][0]
    username, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    registry = data["proxyEndpoint"].removeprefix("https://").removeprefix("http://")
    return RegistryLogin(registry, username, password)


def push_commands(
    engine: str,
    local_image: str,
    remote_image: str,
    login: RegistryLogin,
    build_context: Path | None = None,
    platform: str = "linux/amd64",
) -> list[list[str]]:
    """The engine commands, in order: [build], login (password on stdin), tag, push."""
    commands = []
    if build_context is not None:
        # SageMaker's GPU hosts are x86_64: build for that even on an arm64 laptop.
        commands.append([engine, "build", "--platform", platform, "-t", local_image, str(build_context)])
    commands.append([engine, "login", "--username", login.username, "--password-stdin", login.registry])
    commands.append([engine, "tag", local_image, remote_image])
    commands.append([engine, "push", remote_image])
    return commands


def run_commands(commands: list[list[str]], password: str) -> None:
    for command in commands:
        print("+", shlex.join(command), flush=True)
        stdin = password.encode() if "--password-stdin" in command else None
        subprocess.run(command, input=stdin, check=True)


def make_ecr_client(region: str | None):
    import boto3

    return boto3.client("ecr", region_name=region)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default=env("ECR_REPOSITORY", "sagemaker-llm"))
    parser.add_argument("--tag", default=env("IMAGE_TAG", "latest"))
    parser.add_argument("--local-image", default=env("LOCAL_IMAGE", "sagemaker-llm:latest"))
    parser.add_argument("--engine", default=env("CONTAINER_ENGINE", "docker"), help="docker or podman")
    parser.add_argument("--build", action="store_true", help=f"build {REPO_ROOT}/Dockerfile first")
    parser.add_argument("--region", default=env("AWS_REGION") or env("AWS_DEFAULT_REGION"))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ecr = make_ecr_client(args.region)
    remote_image = f"{ensure_repository(ecr, args.repository)}:{args.tag}"
    login = registry_login(ecr)
    commands = push_commands(args.engine, args.local_image, remote_image, login, REPO_ROOT if args.build else None)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
    else:
        run_commands(commands, login.password)
    print(remote_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
