"""Where attached disks go on the master target's SCSI controllers, and disk sizes."""

from __future__ import annotations

import pytest

from mastertarget.errors import VsphereError
from mastertarget.vsphere.cli import parse_size
from mastertarget.vsphere.inventory import Controller, Vm
from mastertarget.vsphere.operations import check_sizes
from mastertarget.vsphere.preflight import is_free_edition
from mastertarget.vsphere.session import Licence, Ref
from mastertarget.vsphere.specs import NEW_CONTROLLER_KEY, Slot, plan_slots
from runtime.errors import InvalidArgumentError


def _vm(controllers: list[Controller], used: dict[int, frozenset[int]]) -> Vm:
    return Vm(
        ref=Ref("VirtualMachine", "vm-1"),
        name="mt01",
        datacenter="DC0",
        template=False,
        power_state="poweredOn",
        host=None,
        datastores=(),
        vmx_path="[ds] mt01/mt01.vmx",
        extra_config={},
        disks=(),
        controllers=tuple(controllers),
        used_units=used,
        snapshots=(),
        recent_tasks=(),
        resource_pool=None,
        bios_uuid="",
    )


PVSCSI = "ParaVirtualSCSIController"


def test_free_units_of_existing_controllers_come_first_and_unit_7_is_skipped() -> None:
    vm = _vm([Controller(1000, 0, PVSCSI)], {1000: frozenset({0, 1, 2, 3, 4, 5, 6})})
    slots, new = plan_slots(vm, 3)
    assert slots == [Slot(1000, 0, 8), Slot(1000, 0, 9), Slot(1000, 0, 10)]
    assert new == []


def test_a_controller_is_added_on_the_lowest_free_bus_when_the_others_are_full() -> None:
    full = frozenset(u for u in range(16) if u != 7)
    vm = _vm(
        [Controller(1000, 0, PVSCSI), Controller(200, 0, "VirtualIDEController")], {1000: full}
    )
    slots, new = plan_slots(vm, 2)
    assert slots == [Slot(NEW_CONTROLLER_KEY, 1, 0), Slot(NEW_CONTROLLER_KEY, 1, 1)]
    assert new == [1]


def test_a_vm_without_scsi_controller_gets_one() -> None:
    slots, new = plan_slots(_vm([Controller(200, 0, "VirtualIDEController")], {}), 16)
    assert new == [0, 1]
    assert [s.unit for s in slots[:15]] == [u for u in range(16) if u != 7]
    assert slots[15] == Slot(NEW_CONTROLLER_KEY - 1, 1, 0)


def test_more_than_sixty_disks_do_not_fit() -> None:
    with pytest.raises(VsphereError, match="has room for 60 more SCSI disks, 61 were asked"):
        plan_slots(_vm([], {}), 61)
    assert len(plan_slots(_vm([], {}), 60)[0]) == 60


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 2**20),
        ("100G", 100 * 2**30),
        ("512m", 2**29),
        ("2TiB", 2 * 2**40),
        ("4 GB", 4 * 2**30),
        ("64K", 2**16),
    ],
)
def test_disk_sizes_are_read_in_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "10Q", "-1G", "1 G B"])
def test_a_size_that_is_no_size_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError, match="expected a number of bytes"):
        parse_size(text)


def test_sizes_vsphere_cannot_make_are_refused() -> None:
    check_sizes([2**30, 62 * 2**40])
    for sizes in ([], [0], [1000], [62 * 2**40 + 1024]):
        with pytest.raises(InvalidArgumentError):
            check_sizes(sizes)


@pytest.mark.parametrize(
    ("edition", "free"),
    [
        ("esxBasic", True),
        ("esx.hypervisor.free", True),
        ("esx.free", True),
        ("eval", False),
        ("esx.enterprisePlus.cpuPackage", False),
        ("", False),
    ],
)
def test_free_esxi_editions_are_known_by_their_key(edition: str, free: bool) -> None:
    assert is_free_edition(Licence(edition, "")) is free
