"""The deny-list: names in any case, symlink targets, and content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exlsp.index.secrets import secret_in_text, secret_name, secret_path

SECRET_NAMES = [
    ".env",
    ".ENV",
    ".env.local",
    "prod.env",
    "id_rsa",
    "ID_RSA",
    "id_ed25519.pub",
    "server.PEM",
    "tls.key",
    "credentials",
    "Credentials.json",
    "credentials.yaml",
    "secrets.toml",
    "config/secret.json",
    "client_credentials.json",
    "application_default_credentials.json",
    ".s3cfg",
    ".vault-token",
    ".yarnrc.yml",
    "kubeconfig.yaml",
    "dev.kubeconfig",
    ".netrc",
    ".npmrc",
    "terraform.tfstate",
    "home/u/.aws/config",
    "home/u/.SSH/known_hosts",
    "C:\\Users\\u\\.aws\\credentials",
]
PLAIN_NAMES = [
    "app.py",
    "environment.py",
    "keys.py",
    "README.md",
    "src/env/config.py",
    "monkey.c",
    # source files with names that are secret as data: read (their content is checked)
    "secrets.py",
    "index/secrets.py",
    "credentials.go",
    "kubeconfig.ts",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names_in_any_case(name: str) -> None:
    assert secret_name(name)


@pytest.mark.parametrize("name", PLAIN_NAMES)
def test_plain_names_pass(name: str) -> None:
    assert not secret_name(name)


def test_a_symlink_is_judged_by_its_target(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TOKEN=1\n")
    os.symlink(tmp_path / ".env", tmp_path / "env.txt")
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host x\n")
    os.symlink(tmp_path / ".ssh", tmp_path / "sshdir")
    (tmp_path / "plain.txt").write_text("x\n")
    os.symlink(tmp_path / "plain.txt", tmp_path / "link.txt")
    assert secret_path(tmp_path / "env.txt")
    assert secret_path(tmp_path / "sshdir" / "config")
    assert not secret_path(tmp_path / "link.txt")
    assert not secret_path(tmp_path / "plain.txt")


# Shapes only: each value is made up for this test.
SECRET_TEXTS = {
    "a private key": "x = 1\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==\n",
    "an AWS access key id": "AWS_ACCESS_KEY_ID = 'AKIA" + "Q" * 16 + "'\n",
    "an AWS secret access key": "aws_secret_access_key = " + "aB3/" * 10 + "\n",
    "a GitHub token": "token = 'ghp_" + "a1B2" * 9 + "'",
    "a Slack token": "SLACK = 'xoxb-1234567890-abcdef'",
    "a Hugging Face token": "HF_TOKEN=hf_" + "x" * 34,
}


@pytest.mark.parametrize("kind", sorted(SECRET_TEXTS))
def test_secret_shapes_in_text(kind: str) -> None:
    assert secret_in_text(SECRET_TEXTS[kind]) == kind


def test_plain_code_is_not_a_secret() -> None:
    code = (Path(__file__).parent / "data" / "example.py").read_text()
    assert secret_in_text(code) is None
    assert secret_in_text("BEGIN PRIVATE KEY handling: see docs; key_id = 'AKIA'") is None
