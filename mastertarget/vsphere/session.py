"""The one door to vCenter: a logged-in pyvmomi connection, typed at its edge.

pyvmomi's bundled stubs type attributes but not its constructors, its
connection calls or its property values, so ``mypy --strict`` sees them as
untyped. pyvmomi is imported here only, and taken as explicit ``Any``: what
this module returns is typed (:class:`Ref`, :class:`Found`, our errors), but
for the data objects among property values, which
:mod:`mastertarget.vsphere.inventory` turns into typed records at once;
:mod:`mastertarget.vsphere.specs` builds the requests from :data:`VIM`.

Properties are always read through the property collector with explicit
property paths, from a container view, page by page. That is what scales to
a vCenter of 10,000 VMs (one round trip per page, not one per property), and
it never asks for a property that is unset, which govmomi's simulator (vcsim)
answers by dropping the connection.

Every pyvmomi exception is turned into an error of :mod:`mastertarget.errors`
that says what was being done and what vCenter answered. The password is
given to pyvmomi once, at login, and never appears in a message.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from xml.parsers.expat import ExpatError

from pyVim import connect as _connect
from pyVmomi import VmomiSupport as _support
from pyVmomi import vim as _vim
from pyVmomi import vmodl as _vmodl

from mastertarget.errors import (
    VsphereConfigError,
    VsphereConnectionError,
    VsphereError,
    VsphereLoginError,
    VsphereNotFoundError,
    VspherePermissionError,
)
from mastertarget.vsphere.config import Secret, VsphereConfig

# pyvmomi's stubs leave these untyped: they are taken as Any, here only.
VIM: Final[Any] = _vim
VMODL: Final[Any] = _vmodl
_SMART_CONNECT: Final[Any] = _connect.SmartConnect
_DISCONNECT: Final[Any] = _connect.Disconnect
_GET_WSDL_TYPE: Final[Any] = _support.GetWsdlType
_MANAGED_OBJECT: Final[Any] = _support.ManagedObject

#: The namespace of vSphere's managed object types (VirtualMachine, HostSystem...).
VIM_NAMESPACE: Final = "urn:vim25"
#: Objects per page of the property collector: vCenter caps a page at its own
#: limit anyway; a thousand VMs with their devices is a few MiB of XML.
PAGE_OBJECTS: Final = 1000
#: First and largest pause between two reads of a running task's state: a
#: reconfigure ends within a second, a long task is not polled faster than 1/s.
TASK_POLL_FIRST_S: Final = 0.05
TASK_POLL_MAX_S: Final = 1.0
#: Task states (vim.TaskInfo.State) that mean the task has not ended.
TASK_UNFINISHED: Final = frozenset({"queued", "running"})

log = logging.getLogger("blockrepl.mastertarget.vsphere")


@dataclass(frozen=True, order=True)
class Ref:
    """A managed object reference: its type (``VirtualMachine``) and id (``vm-57``)."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class Found:
    """One object read by the property collector.

    Args:
        ref: the object.
        props: each property path read and its value: a :class:`Ref` or a
            tuple of them for references, pyvmomi data objects otherwise. A
            path whose value is unset, or that the account may not read, is
            absent.
    """

    ref: Ref
    props: Mapping[str, Any]

    def get(self, path: str, default: Any = None) -> Any:
        """The value of ``path``, or ``default`` when it is unset."""
        return self.props.get(path, default)


@dataclass(frozen=True)
class About:
    """What the server says it is (vim.AboutInfo)."""

    full_name: str
    api_type: str  # "VirtualCenter" for vCenter, "HostAgent" for an ESXi host
    api_version: str
    instance_uuid: str

    @property
    def is_vcenter(self) -> bool:
        """True for vCenter, False for an ESXi host reached directly."""
        return self.api_type == "VirtualCenter"


@dataclass(frozen=True)
class Licence:
    """A licence assigned to a host: its edition key (``esxBasic``...) and name."""

    edition_key: str
    name: str


class VsphereSession:
    """A logged-in connection to vCenter or an ESXi host; close it (or use ``with``).

    Args:
        config: the vSphere config.
        si: pyvmomi's ServiceInstance, logged in.
    """

    def __init__(self, config: VsphereConfig, si: Any) -> None:
        self.config = config
        self._si = si
        with self.faults("reading the service content"):
            self._content = si.content
            about = self._content.about
            self.about = About(
                full_name=str(about.fullName),
                api_type=str(about.apiType),
                api_version=str(about.apiVersion),
                instance_uuid=str(about.instanceUuid or ""),
            )
            self.session_key = str(self._content.sessionManager.currentSession.key)

    @classmethod
    def connect(cls, config: VsphereConfig, password: Secret) -> VsphereSession:
        """Log in to ``config.host`` as ``config.user``, verifying its certificate.

        Raises:
            VsphereConfigError: ``ca_file`` cannot be loaded.
            VsphereConnectionError: the server cannot be reached, or its
                certificate does not verify.
            VsphereLoginError: the user name or password is refused.
        """
        context = _tls_context(config)
        where = f"{config.host}:{config.port}"
        log.info("connecting to %s as %s", where, config.user)
        with _faults(config, f"logging in to {where} as {config.user}"):
            si = _SMART_CONNECT(
                host=config.host,
                port=config.port,
                user=config.user,
                pwd=password.reveal(),
                sslContext=context,
                httpConnectionTimeout=config.request_timeout_s,
            )
        session = cls(config, si)
        log.info(
            "connected to %s (%s, API %s)",
            where,
            session.about.full_name,
            session.about.api_version,
        )
        return session

    def close(self) -> None:
        """Log out; a failure to log out is logged, not raised (the session expires)."""
        try:
            _DISCONNECT(self._si)
        except Exception as exc:  # logging out must not hide the command's real result
            log.warning("logging out of %s failed: %s", self.config.host, type(exc).__name__)

    def __enter__(self) -> VsphereSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- objects ----------------------------------------------------------------------

    @property
    def root_folder(self) -> Ref:
        """The root of the inventory."""
        return to_ref(self._content.rootFolder)

    @property
    def task_manager(self) -> Ref:
        """The task manager: its ``recentTask`` lists queued, running and recent tasks."""
        return to_ref(self._content.taskManager)

    def managed(self, ref: Ref) -> Any:
        """The pyvmomi managed object of ``ref``, bound to this connection."""
        kind = _GET_WSDL_TYPE(VIM_NAMESPACE, ref.kind)
        return kind(ref.value, self._si._stub)

    # --- reading ----------------------------------------------------------------------

    def collect(self, root: Ref, kind: str, paths: Sequence[str]) -> list[Found]:
        """Every object of type ``kind`` under ``root`` (recursively), with ``paths``.

        Objects the account may not view are not in a container view: vCenter
        leaves them out, so an empty answer may mean no permission.
        """
        what = f"listing {kind} objects"
        with self.faults(what):
            view = self._content.viewManager.CreateContainerView(
                self.managed(root), [_GET_WSDL_TYPE(VIM_NAMESPACE, kind)], True
            )
        try:
            traverse = VMODL.query.PropertyCollector.TraversalSpec(
                name="view", type=VIM.view.ContainerView, path="view", skip=False
            )
            start = VMODL.query.PropertyCollector.ObjectSpec(
                obj=view, skip=True, selectSet=[traverse]
            )
            return self._retrieve(what, kind, [start], paths)
        finally:
            with contextlib.suppress(VsphereError), self.faults("destroying a container view"):
                view.DestroyView()

    def collect_refs(self, refs: Sequence[Ref], paths: Sequence[str]) -> list[Found]:
        """The objects ``refs`` (all of one type), with ``paths``."""
        if not refs:
            return []
        kinds = {ref.kind for ref in refs}
        if len(kinds) != 1:
            raise ValueError(f"collect_refs takes objects of one type, found {sorted(kinds)}")
        starts = [VMODL.query.PropertyCollector.ObjectSpec(obj=self.managed(r)) for r in refs]
        return self._retrieve(f"reading {len(refs)} {refs[0].kind}", refs[0].kind, starts, paths)

    def _retrieve(
        self, what: str, kind: str, starts: list[Any], paths: Sequence[str]
    ) -> list[Found]:
        prop = VMODL.query.PropertyCollector.PropertySpec(
            type=_GET_WSDL_TYPE(VIM_NAMESPACE, kind), pathSet=list(paths)
        )
        spec = VMODL.query.PropertyCollector.FilterSpec(objectSet=starts, propSet=[prop])
        options = VMODL.query.PropertyCollector.RetrieveOptions(maxObjects=PAGE_OBJECTS)
        collector = self._content.propertyCollector
        found: list[Found] = []
        with self.faults(what):
            page = collector.RetrievePropertiesEx([spec], options)
            while page is not None:
                found.extend(_found(item) for item in page.objects)
                token = page.token
                page = collector.ContinueRetrievePropertiesEx(token) if token else None
        return found

    def granted(
        self, entities: Sequence[Ref], privileges: Sequence[str]
    ) -> dict[Ref, frozenset[str]]:
        """Which of ``privileges`` this session holds on each of ``entities``."""
        if not entities:
            return {}
        with self.faults("checking the account's privileges"):
            answer = self._content.authorizationManager.HasPrivilegeOnEntities(
                entity=[self.managed(e) for e in entities],
                sessionId=self.session_key,
                privId=list(privileges),
            )
            return {
                to_ref(item.entity): frozenset(
                    str(p.privId) for p in item.privAvailability if p.isGranted
                )
                for item in answer
            }

    def host_licences(self, host: Ref) -> tuple[Licence, ...]:
        """The licences of ``host``: assigned by vCenter, or the host's own when direct."""
        with self.faults(f"reading the licence of host {host}"):
            manager = self._content.licenseManager
            if self.about.is_vcenter:
                assignments = manager.licenseAssignmentManager.QueryAssignedLicenses(
                    entityId=host.value
                )
                infos = [a.assignedLicense for a in assignments]
            else:
                infos = list(manager.licenses)
            return tuple(Licence(str(i.editionKey or ""), str(i.name or "")) for i in infos)

    def disk_uuid(self, datacenter: Ref, file_name: str) -> str:
        """The UUID of a VMDK as the VirtualDiskManager reads it from its descriptor."""
        with self.faults(f"reading the UUID of {file_name}"):
            manager = self._content.virtualDiskManager
            return str(
                manager.QueryVirtualDiskUuid(name=file_name, datacenter=self.managed(datacenter))
            )

    # --- changing ---------------------------------------------------------------------

    def reconfigure(self, vm: Ref, spec: Any, what: str) -> None:
        """Run ReconfigVM_Task on ``vm`` and wait for it to end."""
        with self.faults(what):
            task = self.managed(vm).ReconfigVM_Task(spec=spec)
        self.wait(task, what)

    def create_vm(self, folder: Ref, spec: Any, pool: Ref, host: Ref, what: str) -> Ref:
        """Run CreateVM_Task in ``folder`` and wait; the new VM."""
        with self.faults(what):
            task = self.managed(folder).CreateVM_Task(
                config=spec, pool=self.managed(pool), host=self.managed(host)
            )
        result = self.wait(task, what)
        if not isinstance(result, Ref):
            raise VsphereError(f"{what}: the task ended without naming the new VM ({result!r})")
        return result

    def wait(self, task: Any, what: str, *, clock: Callable[[], float] = time.monotonic) -> Any:
        """Wait for ``task`` to end; its result.

        Raises:
            VsphereError: the task failed (the message is vCenter's), or did
                not end within ``task_timeout_s`` (it may still end later).
        """
        ref = to_ref(task)
        deadline = clock() + self.config.task_timeout_s
        pause = TASK_POLL_FIRST_S
        paths = ("info.state", "info.error", "info.result")
        while True:
            found = self.collect_refs([ref], paths)
            if not found:
                raise VsphereNotFoundError(
                    f"{what}: task {ref.value} is gone from {self.config.host}"
                )
            info = found[0]
            state = str(info.get("info.state", "queued"))
            if state not in TASK_UNFINISHED:
                break
            if clock() >= deadline:
                raise VsphereError(
                    f"{what}: task {ref.value} still {state} after {self.config.task_timeout_s:g} s"
                    " (task_timeout_s); it may still end: look at the vSphere client's recent"
                    " tasks before retrying"
                )
            time.sleep(pause)
            pause = min(pause * 2, TASK_POLL_MAX_S)
        if state != "success":
            fault = info.get("info.error")
            raise _translate(getattr(fault, "fault", None) or fault, what, self.config)
        return info.get("info.result")

    def faults(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Turn what pyvmomi raises while doing ``what`` into our errors."""
        return _faults(self.config, what)


@contextlib.contextmanager
def _faults(config: VsphereConfig, what: str) -> Iterator[None]:
    # What vCenter or the network can cause; anything else is a bug and keeps its traceback.
    try:
        yield
    except (OSError, http.client.HTTPException, ExpatError) as exc:
        raise _translate(exc, what, config) from None
    except VMODL.MethodFault as exc:
        raise _translate(exc, what, config) from None


def to_ref(managed: Any) -> Ref:
    """The :class:`Ref` of a pyvmomi managed object."""
    return Ref(str(managed._wsdlName), str(managed._moId))


def _plain(value: Any) -> Any:
    """References as :class:`Ref` (lists as tuples of them), data objects as they are."""
    if isinstance(value, _MANAGED_OBJECT):
        return to_ref(value)
    if isinstance(value, list) and value and isinstance(value[0], _MANAGED_OBJECT):
        return tuple(to_ref(item) for item in value)
    return value


def _found(item: Any) -> Found:
    return Found(to_ref(item.obj), {str(p.name): _plain(p.val) for p in item.propSet})


def _tls_context(config: VsphereConfig) -> ssl.SSLContext:
    """A client context that trusts ``ca_file`` only and checks the host name."""
    try:
        context = ssl.create_default_context(cafile=str(config.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise VsphereConfigError(
            f"ca_file {config.ca_file}: cannot load CA certificates from it: {exc}; expected"
            " PEM certificates (vCenter's root CA, from https://VCENTER/certs/download.zip)"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # vCenter 6.7 and ESXi 6.7 top out at 1.2
    return context


def _translate(exc: Any, what: str, config: VsphereConfig) -> Exception:
    """Our error for an exception pyvmomi raised (or a task's fault) while doing ``what``."""
    where = f"{config.host}:{config.port}"
    if isinstance(exc, VMODL.MethodFault):
        return _translate_fault(exc, what, config)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return VsphereConnectionError(
            f"{what}: the certificate of {where} does not verify against ca_file"
            f" {config.ca_file}: {exc.verify_message}; expected a certificate signed by a CA"
            f" in that file and naming {config.host}"
        )
    if isinstance(exc, OSError | http.client.HTTPException | ExpatError):
        return VsphereConnectionError(
            f"{what}: cannot talk to {where}: {exc or type(exc).__name__}"
        )
    return VsphereError(f"{what}: unexpected {type(exc).__name__} from pyvmomi: {exc}")


def _translate_fault(fault: Any, what: str, config: VsphereConfig) -> VsphereError:
    """Our error for a fault vCenter answered."""
    where = f"{config.host}:{config.port}"
    if isinstance(fault, VIM.fault.InvalidLogin):
        return VsphereLoginError(
            f"{what}: {where} refused the user name or password of {config.user} (check"
            " password_file or the environment variable, and whether the account is locked)"
        )
    if isinstance(fault, VIM.fault.NoPermission):
        privilege = str(fault.privilegeId or "")
        target = to_ref(fault.object) if fault.object is not None else None
        return VspherePermissionError(
            f"{what}: the account {config.user} lacks the privilege {privilege} on {target}:"
            " grant it (docs/operations.md lists what the account needs)",
            details={"privilege": privilege, "object": str(target)},
        )
    if isinstance(fault, VMODL.fault.ManagedObjectNotFound):
        return VsphereNotFoundError(f"{what}: {where} no longer has the object {to_ref(fault.obj)}")
    message = str(fault.msg or "") or type(fault).__name__
    return VsphereError(f"{what}: {where} answered {type(fault).__name__}: {message}")
