// Command vcsim-launcher runs govmomi's vCenter simulator (simulator.VPX()) on
// loopback for blockrepl's pyvmomi tests.
//
// It adds the few behaviours of a real vCenter that the simulator of Debian's
// govmomi lacks and that the product must react to:
//
//   - accounts with roles (-account NAME:PASSWORD:ROLE). Admin may do
//     anything; ReadOnly holds System.Anonymous, System.View and System.Read,
//     so it sees the inventory and is refused every change with NoPermission;
//     NoDatastoreAccess is ReadOnly with no access at all to datastores: they
//     are missing from its container views, as vCenter hides entities a user
//     may not view. A wrong user name or password is refused with InvalidLogin.
//     AuthorizationManager.HasPrivilegeOnEntities answers by these roles.
//   - licence editions per host (-host-edition HOST=EDITION), for a free ESXi
//     (esxBasic) behind QueryAssignedLicenses.
//   - a storage vMotion in progress (-relocating VM): a RelocateVM_Task of
//     that VM that stays running.
//   - a server certificate signed by a CA of its own, written to DIR/ca.pem
//     (the simulator's built-in certificate has a 1024-bit key, which
//     OpenSSL 3 refuses).
//
// When it serves, it prints one JSON line on standard output:
// {"url": "https://127.0.0.1:PORT/sdk", "ca_file": "DIR/ca.pem"}. It stops
// when standard input closes or on SIGTERM, and removes its datastore folders.
//
// Build (GOPATH mode, from Debian's golang-github-vmware-govmomi-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o vcsim-launcher .
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"html"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	neturl "net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// publicPath is where clients reach the SDK; the simulator itself serves on
// innerPath, behind the account checks of sdkFront.
const (
	publicPath = "/sdk"
	innerPath  = "/vcsim-inner-sdk"
)

// Roles by name, as vCenter names its system roles (NoDatastoreAccess is a
// custom role: ReadOnly, with "No access" on the datastores).
const (
	roleAdmin             = "Admin"
	roleReadOnly          = "ReadOnly"
	roleNoDatastoreAccess = "NoDatastoreAccess"
)

// readOnlyPrivileges are the privileges of vCenter's ReadOnly role.
var readOnlyPrivileges = map[string]bool{
	"System.Anonymous": true,
	"System.View":      true,
	"System.Read":      true,
}

// readOnlyMethods may be called by any logged-in account: they read.
var readOnlyMethods = map[string]bool{
	"RetrieveServiceContent": true, "Login": true, "Logout": true, "SessionIsActive": true,
	"RetrieveProperties": true, "RetrievePropertiesEx": true, "ContinueRetrievePropertiesEx": true,
	"CancelRetrievePropertiesEx": true, "CreateFilter": true, "DestroyPropertyFilter": true,
	"WaitForUpdates": true, "WaitForUpdatesEx": true, "CheckForUpdates": true, "Fetch": true,
	"CreatePropertyCollector": true, "DestroyPropertyCollector": true,
	"CreateContainerView": true, "CreateListView": true, "DestroyView": true, "CurrentTime": true,
	"HasPrivilegeOnEntities": true, "HasPrivilegeOnEntity": true, "QueryAssignedLicenses": true,
	"QueryVirtualDiskUuid": true, "FindByUuid": true, "FindByInventoryPath": true,
	"FindChild": true, "RetrieveEntityPermissions": true, "RetrieveAllPermissions": true,
}

// changePrivileges names the privilege a refused change lacks, as vCenter
// reports it in NoPermission.privilegeId.
var changePrivileges = map[string]string{
	"CreateVM_Task":           "VirtualMachine.Inventory.Create",
	"Destroy_Task":            "VirtualMachine.Inventory.Delete",
	"PowerOnVM_Task":          "VirtualMachine.Interact.PowerOn",
	"PowerOffVM_Task":         "VirtualMachine.Interact.PowerOff",
	"CreateSnapshot_Task":     "VirtualMachine.State.CreateSnapshot",
	"RemoveAllSnapshots_Task": "VirtualMachine.State.RemoveSnapshot",
	"RelocateVM_Task":         "Resource.ColdMigrate",
	"CreateLocalDatastore":    "Host.Config.Storage",
}

type account struct {
	password string
	role     string
}

// accounts maps user names to accounts, and session cookies to user names.
type accounts struct {
	byName    map[string]account
	mu        sync.Mutex
	bySession map[string]string
}

func (a *accounts) roleOf(user string) string {
	return a.byName[user].role
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	dir := flag.String("dir", "", "folder for ca.pem (required)")
	var accountFlags, editionFlags, relocatingFlags multiFlag
	flag.Var(&accountFlags, "account", "NAME:PASSWORD:ROLE (repeatable)")
	flag.Var(&editionFlags, "host-edition", "HOST=EDITION licence of a host (repeatable)")
	flag.Var(&relocatingFlags, "relocating", "VM being storage-vMotioned (repeatable)")
	flag.Parse()
	if *dir == "" || len(accountFlags) == 0 {
		log.Fatal("expected -dir and at least one -account")
	}
	users, err := parseAccounts(accountFlags)
	if err != nil {
		log.Fatal(err)
	}
	editions, err := parsePairs(editionFlags)
	if err != nil {
		log.Fatal(err)
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()
	simulator.Map.Path = innerPath

	installRoles(users)
	installLicences(editions)
	for _, name := range relocatingFlags {
		if err := startRelocation(name); err != nil {
			log.Fatal(err)
		}
	}

	caFile := filepath.Join(*dir, "ca.pem")
	config, err := serverTLS(caFile)
	if err != nil {
		log.Fatal(err)
	}
	service := model.Service
	service.TLS = config
	service.Listen = &neturl.URL{Host: *listen}
	service.ServeMux = http.NewServeMux()
	front := &sdkFront{users: users, mux: service.ServeMux}
	service.ServeMux.Handle(publicPath, front)
	service.ServeMux.Handle(publicPath+"/", front)
	server := service.NewServer()
	defer server.Close()

	ready := map[string]string{
		"url":     "https://" + server.URL.Host + publicPath,
		"ca_file": caFile,
	}
	if err := json.NewEncoder(os.Stdout).Encode(ready); err != nil {
		log.Fatal(err)
	}
	waitForStop()
}

func parseAccounts(values []string) (*accounts, error) {
	users := &accounts{byName: map[string]account{}, bySession: map[string]string{}}
	for _, value := range values {
		parts := strings.SplitN(value, ":", 3)
		if len(parts) != 3 || parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("-account: expected NAME:PASSWORD:ROLE, found %q", value)
		}
		switch parts[2] {
		case roleAdmin, roleReadOnly, roleNoDatastoreAccess:
		default:
			return nil, fmt.Errorf("-account %s: unknown role %q", parts[0], parts[2])
		}
		users.byName[parts[0]] = account{password: parts[1], role: parts[2]}
	}
	return users, nil
}

func parsePairs(values []string) (map[string]string, error) {
	pairs := map[string]string{}
	for _, value := range values {
		parts := strings.SplitN(value, "=", 2)
		if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
			return nil, fmt.Errorf("expected NAME=VALUE, found %q", value)
		}
		pairs[parts[0]] = parts[1]
	}
	return pairs, nil
}

// waitForStop returns when standard input closes (the test process died) or
// on SIGTERM/SIGINT.
func waitForStop() {
	stop := make(chan struct{}, 2)
	go func() {
		_, _ = io.Copy(ioutil.Discard, os.Stdin)
		stop <- struct{}{}
	}()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		stop <- struct{}{}
	}()
	<-stop
}

// --- the SDK front: accounts, sessions, refusals -------------------------------

type sdkFront struct {
	users *accounts
	mux   *http.ServeMux
}

func (f *sdkFront) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	inner := r.Clone(r.Context())
	inner.URL.Path = innerPath + strings.TrimPrefix(r.URL.Path, publicPath)
	if r.Method != http.MethodPost || r.URL.Path != publicPath {
		f.mux.ServeHTTP(w, inner)
		return
	}
	body, err := ioutil.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	inner.Body = ioutil.NopCloser(bytes.NewReader(body))
	method, err := simulator.UnmarshalBody(types.TypeFunc(), body)
	if err != nil {
		f.mux.ServeHTTP(w, inner) // the simulator answers with its own fault
		return
	}
	switch method.Name {
	case "Login":
		f.login(w, inner, method)
		return
	case "Logout":
		f.forget(r)
	}
	user := f.sessionUser(r)
	if user != "" && f.users.roleOf(user) != roleAdmin && !readOnlyMethods[method.Name] {
		detail, message := noPermission(method)
		writeFault(w, detail, message)
		return
	}
	f.mux.ServeHTTP(w, inner)
}

func (f *sdkFront) login(w http.ResponseWriter, r *http.Request, method *simulator.Method) {
	req, ok := method.Body.(*types.Login)
	if !ok {
		f.mux.ServeHTTP(w, r)
		return
	}
	known, found := f.users.byName[req.UserName]
	if !found || known.password != req.Password {
		writeFault(w, "<InvalidLoginFault xmlns=\"urn:vim25\" xsi:type=\"InvalidLogin\"></InvalidLoginFault>",
			"Cannot complete login due to an incorrect user name or password.")
		return
	}
	f.mux.ServeHTTP(w, r)
	for _, line := range w.Header().Values("Set-Cookie") {
		cookie := (&http.Response{Header: http.Header{"Set-Cookie": {line}}}).Cookies()
		for _, c := range cookie {
			if c.Name == soap.SessionCookieName {
				f.users.mu.Lock()
				f.users.bySession[c.Value] = req.UserName
				f.users.mu.Unlock()
			}
		}
	}
}

func (f *sdkFront) sessionUser(r *http.Request) string {
	cookie, err := r.Cookie(soap.SessionCookieName)
	if err != nil {
		return ""
	}
	f.users.mu.Lock()
	defer f.users.mu.Unlock()
	return f.users.bySession[cookie.Value]
}

func (f *sdkFront) forget(r *http.Request) {
	if cookie, err := r.Cookie(soap.SessionCookieName); err == nil {
		f.users.mu.Lock()
		delete(f.users.bySession, cookie.Value)
		f.users.mu.Unlock()
	}
}

// noPermission is the detail and message of the NoPermission fault vCenter
// answers a change with when the account lacks its privilege.
func noPermission(method *simulator.Method) (string, string) {
	privilege, found := changePrivileges[method.Name]
	if method.Name == "ReconfigVM_Task" {
		privilege, found = reconfigPrivilege(method.Body.(*types.ReconfigVM_Task).Spec), true
	}
	if !found {
		// Not a privilege of vCenter's: a method this launcher has no entry for.
		privilege = "System.Modify"
	}
	detail := fmt.Sprintf(
		"<NoPermissionFault xmlns=\"urn:vim25\" xsi:type=\"NoPermission\">"+
			"<object type=\"%s\">%s</object><privilegeId>%s</privilegeId></NoPermissionFault>",
		html.EscapeString(method.This.Type), html.EscapeString(method.This.Value),
		html.EscapeString(privilege))
	return detail, "Permission to perform this operation was denied."
}

// reconfigPrivilege is the first privilege a ReconfigVM_Task spec needs.
func reconfigPrivilege(spec types.VirtualMachineConfigSpec) string {
	for _, change := range spec.DeviceChange {
		dspec := change.GetVirtualDeviceConfigSpec()
		_, disk := dspec.Device.(*types.VirtualDisk)
		switch {
		case disk && dspec.Operation == types.VirtualDeviceConfigSpecOperationAdd &&
			dspec.FileOperation == "":
			return "VirtualMachine.Config.AddExistingDisk"
		case disk && dspec.Operation == types.VirtualDeviceConfigSpecOperationAdd:
			return "VirtualMachine.Config.AddNewDisk"
		case disk && dspec.Operation == types.VirtualDeviceConfigSpecOperationRemove:
			return "VirtualMachine.Config.RemoveDisk"
		default:
			return "VirtualMachine.Config.AddRemoveDevice"
		}
	}
	return "VirtualMachine.Config.Settings"
}

func writeFault(w http.ResponseWriter, detail string, message string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" `+
		`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" `+
		`xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
		`<detail>%s</detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`,
		html.EscapeString(message), detail)
}

// --- roles inside the simulator ------------------------------------------------

// authorization answers HasPrivilegeOnEntities by the roles of the accounts.
type authorization struct {
	simulator.AuthorizationManager
	users *accounts
}

func (a *authorization) HasPrivilegeOnEntities(ctx *simulator.Context, req *types.HasPrivilegeOnEntities) soap.HasFault {
	body := &methods.HasPrivilegeOnEntitiesBody{}
	if ctx.Session == nil || req.SessionId != ctx.Session.Key {
		body.Fault_ = simulator.Fault("only the caller's own session is known", &types.InvalidArgument{InvalidProperty: "sessionId"})
		return body
	}
	role := a.users.roleOf(ctx.Session.UserName)
	result := []types.EntityPrivilege{}
	for _, entity := range req.Entity {
		granted := types.EntityPrivilege{Entity: entity}
		for _, id := range req.PrivId {
			granted.PrivAvailability = append(granted.PrivAvailability, types.PrivilegeAvailability{
				PrivId: id, IsGranted: grants(role, id, entity),
			})
		}
		result = append(result, granted)
	}
	body.Res = &types.HasPrivilegeOnEntitiesResponse{Returnval: result}
	return body
}

func grants(role string, privilege string, entity types.ManagedObjectReference) bool {
	switch role {
	case roleAdmin:
		return true
	case roleNoDatastoreAccess:
		if isDatastoreEntity(entity) {
			return false
		}
	}
	return readOnlyPrivileges[privilege]
}

// isDatastoreEntity: a datastore, or a folder of datastores.
func isDatastoreEntity(ref types.ManagedObjectReference) bool {
	if ref.Type == "Datastore" || ref.Type == "StoragePod" {
		return true
	}
	if ref.Type != "Folder" {
		return false
	}
	folder, ok := simulator.Map.Get(ref).(*simulator.Folder)
	if !ok {
		return false
	}
	for _, kind := range folder.ChildType {
		if kind == "Datastore" {
			return true
		}
	}
	return false
}

// views hides datastores from the container views of NoDatastoreAccess accounts.
type views struct {
	simulator.ViewManager
	users *accounts
}

func (v *views) CreateContainerView(ctx *simulator.Context, req *types.CreateContainerView) soap.HasFault {
	result := v.ViewManager.CreateContainerView(ctx, req)
	body, ok := result.(*methods.CreateContainerViewBody)
	if !ok || body.Res == nil || v.users.roleOf(ctx.Session.UserName) != roleNoDatastoreAccess {
		return result
	}
	view, ok := ctx.Session.Get(body.Res.Returnval).(*simulator.ContainerView)
	if !ok {
		return result
	}
	visible := view.View[:0]
	for _, ref := range view.View {
		if !isDatastoreEntity(ref) {
			visible = append(visible, ref)
		}
	}
	view.View = visible
	return result
}

func installRoles(users *accounts) {
	content := simulator.Map.Get(serviceInstance()).(*simulator.ServiceInstance).Content
	authz := simulator.Map.Get(*content.AuthorizationManager).(*simulator.AuthorizationManager)
	simulator.Map.Put(&authorization{AuthorizationManager: *authz, users: users})
	viewManager := simulator.Map.Get(*content.ViewManager).(*simulator.ViewManager)
	simulator.Map.Put(&views{ViewManager: *viewManager, users: users})
}

func serviceInstance() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "ServiceInstance", Value: "ServiceInstance"}
}

// --- licences ----------------------------------------------------------------

// licences answers QueryAssignedLicenses with the edition given for a host.
type licences struct {
	simulator.LicenseAssignmentManager
	byHostID map[string]string
}

func (l *licences) QueryAssignedLicenses(req *types.QueryAssignedLicenses) soap.HasFault {
	edition, found := l.byHostID[req.EntityId]
	if !found {
		return l.LicenseAssignmentManager.QueryAssignedLicenses(req)
	}
	info := simulator.EvalLicense
	info.LicenseKey = "FREE0-00000-00000-00000-00000"
	info.EditionKey = edition
	info.Name = "VMware vSphere Hypervisor"
	return &methods.QueryAssignedLicensesBody{Res: &types.QueryAssignedLicensesResponse{
		Returnval: []types.LicenseAssignmentManagerLicenseAssignment{{EntityId: req.EntityId, AssignedLicense: info}},
	}}
}

func installLicences(editions map[string]string) {
	byHostID := map[string]string{}
	for name, edition := range editions {
		host := findByName("HostSystem", name)
		if host == nil {
			log.Fatalf("-host-edition: no host %q", name)
		}
		byHostID[host.Reference().Value] = edition
	}
	content := simulator.Map.Get(serviceInstance()).(*simulator.ServiceInstance).Content
	manager := simulator.Map.Get(*content.LicenseManager).(*simulator.LicenseManager)
	ref := *manager.LicenseAssignmentManager
	assignments := simulator.Map.Get(ref).(*simulator.LicenseAssignmentManager)
	simulator.Map.Put(&licences{LicenseAssignmentManager: *assignments, byHostID: byHostID})
}

func findByName(kind string, name string) mo.Entity {
	for _, entity := range simulator.Map.All(kind) {
		if entity.Entity().Name == name {
			return entity
		}
	}
	return nil
}

// --- a storage vMotion that does not end ----------------------------------------

func startRelocation(name string) error {
	vm := findByName("VirtualMachine", name)
	if vm == nil {
		return fmt.Errorf("-relocating: no VM %q", name)
	}
	never := make(chan struct{})
	task := simulator.CreateTask(vm, "relocate", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		<-never
		return nil, nil
	})
	task.Info.Name = "RelocateVM_Task"
	go task.Run()
	return nil
}

// --- TLS ---------------------------------------------------------------------

// serverTLS makes a CA and a server certificate for 127.0.0.1 signed by it,
// and writes the CA certificate to caFile.
func serverTLS(caFile string) (*tls.Config, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vcsim test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "vcsim"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := ioutil.WriteFile(caFile, caPEM, 0o644); err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
	}, nil
}
