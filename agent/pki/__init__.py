"""The deployment's private certificate authority: what ``blockrepl certs`` runs
(docs/design.md invariant 7).

``blockrepl certs init`` makes, in one directory: the CA (``ca.pem``,
``ca.key``) and the two server certificates (``processserver.pem/.key``,
``mastertarget.pem/.key``). ``blockrepl certs issue`` adds a client certificate
``machine-M.pem/.key`` for one machine M, whose subject CN is the machine id a
server authorises writes by (runtime/tls.py ``peer_identity``); with
``--group``, the certificate ``group-M.pem/.key`` M uses on the consistency
group port, where it is a server to its coordinator and a client to the
other members (docs/groups.md).

Choices, each for a reason:

* ECDSA P-256 with SHA-256: small and fast handshakes, supported by every TLS
  1.3 stack.
* The CA may sign leaves only (``pathLenConstraint = 0``); server certificates
  carry serverAuth only and machine certificates clientAuth only, so neither
  can act in the other role (OpenSSL checks the purpose in the handshake).
  A group certificate carries both, as agents of a group serve each other,
  but no DNS or IP name: it cannot pass as a process server or master target
  (their clients check the host name), and group peers check its CN instead.
* CA valid 10 years, leaves 825 days by default: the longest leaf lifetime
  that common TLS clients still accept.
* ``notBefore`` a few minutes in the past: a host whose clock lags a little
  must not refuse a certificate made a moment ago.
* Nothing is ever overwritten: a second CA would silently cut off every
  machine holding a certificate from the first.

Private keys are PEM PKCS#8, unencrypted (a daemon starts unattended), mode
0600; certificates mode 0644; all written with runtime/crashsafe.py.

It is the admin command's tool: the daemons only read the files it wrote
(runtime/tls.py), and never import it. :mod:`agent.pki.certificates` builds
and encodes the certificates, :mod:`agent.pki.authority` keeps the CA's
directory.
"""

from agent.pki.authority import (
    CA_CERT_NAME,
    CA_KEY_NAME,
    CERTIFICATE_MODE,
    CRL_NAME,
    PRIVATE_KEY_MODE,
    SERVER_NAMES,
    CertificateFiles,
    DeploymentPki,
    Revocation,
    init_ca,
    issue_machine,
    machine_file_names,
    revoke,
)
from agent.pki.certificates import CA_VALIDITY_DAYS, CLOCK_SKEW_ALLOWANCE, LEAF_VALIDITY_DAYS

__all__ = [
    "CA_CERT_NAME",
    "CA_KEY_NAME",
    "CA_VALIDITY_DAYS",
    "CERTIFICATE_MODE",
    "CLOCK_SKEW_ALLOWANCE",
    "CRL_NAME",
    "LEAF_VALIDITY_DAYS",
    "PRIVATE_KEY_MODE",
    "SERVER_NAMES",
    "CertificateFiles",
    "DeploymentPki",
    "Revocation",
    "init_ca",
    "issue_machine",
    "machine_file_names",
    "revoke",
]
