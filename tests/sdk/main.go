// Command sdk-acceptance drives a Firecracker-API VMM (flick or Firecracker)
// through the Firecracker Go SDK the way the SDK's README shows, and prints
// one line per step:
//
//	PASS <step>
//	FAIL <step>: <error>
//	SKIP <step>: <reason>
//
// It builds against the SDK in GOPATH mode (see scripts/sdk-acceptance.sh);
// it uses only calls present in both SDK v1.0.0 and the SDK's current head.
//
// Each group of steps runs on its own machine, so that a device one VMM does
// not support fails its own steps only:
//
//	core     kernel, root drive with a rate limiter, TAP NIC with rate limiters,
//	         log FIFO, metrics file; Start, version, instance info, pause/resume,
//	         drive update, rate-limiter updates, metrics, full snapshot,
//	         Ctrl+Alt+Del shutdown
//	restore  a new machine loaded from the snapshot (WithSnapshot, resume)
//	mmds     a NIC with AllowMMDS; Set/Get/UpdateMetadata
//	vsock    a vsock device; its unix socket
//	balloon  the SDK's balloon handler; Update/Get balloon and statistics
//	default-builder  the SDK's own command builder: "firecracker" found on PATH
//	         (a symlink to -bin), run as <bin> --api-sock S --id <uuid> --no-seccomp
//	stop     StopVMM
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"time"

	firecracker "github.com/firecracker-microvm/firecracker-go-sdk"
	models "github.com/firecracker-microvm/firecracker-go-sdk/client/models"
	ops "github.com/firecracker-microvm/firecracker-go-sdk/client/operations"
	"github.com/google/uuid"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

var (
	binPath      = flag.String("bin", "", "VMM binary (flick or firecracker)")
	kernelPath   = flag.String("kernel", "", "guest kernel (ELF)")
	rootfsPath   = flag.String("rootfs", "", "root drive image (copied into -workdir)")
	bootArgs     = flag.String("boot-args", "console=ttyS0 reboot=k panic=1 pci=off", "guest kernel command line")
	tapName      = flag.String("tap", "", "TAP device for the NIC steps (empty: NIC steps are skipped)")
	workDir      = flag.String("workdir", "", "directory for sockets, logs, snapshots (must exist)")
	memMiB       = flag.Int64("mem", 128, "guest memory (MiB)")
	vcpus        = flag.Int64("vcpus", 1, "vCPUs")
	bootWait     = flag.Duration("boot-wait", 0, "wait this long after Start before pausing (lets the guest boot)")
	shutdownWait = flag.Duration("shutdown-wait", 10*time.Second, "how long the VMM may take to exit after Ctrl+Alt+Del")
	only         = flag.String("only", "", "comma-separated groups to run (core,restore,mmds,vsock,balloon,stop); default all")
)

func pass(step string) { fmt.Printf("PASS %s\n", step) }
func fail(step string, err error) {
	fmt.Printf("FAIL %s: %s\n", step, strings.ReplaceAll(err.Error(), "\n", " "))
}
func skip(step, why string) { fmt.Printf("SKIP %s: %s\n", step, why) }

// check prints PASS or FAIL for step and reports whether it passed.
func check(step string, err error) bool {
	if err != nil {
		fail(step, err)
		return false
	}
	pass(step)
	return true
}

func want(group string) bool {
	if *only == "" {
		return true
	}
	for _, g := range strings.Split(*only, ",") {
		if g == group {
			return true
		}
	}
	return false
}

func logger(name string) *logrus.Entry {
	l := logrus.New()
	f, err := os.Create(filepath.Join(*workDir, name+".sdk.log"))
	if err == nil {
		l.SetOutput(f)
	}
	l.SetLevel(logrus.DebugLevel)
	return logrus.NewEntry(l)
}

// command is what the SDK's default command builder runs
// (`<bin> --api-sock S --id <id> --no-seccomp`), with the VMM's output sent to
// a file instead of this program's stdout.
func command(ctx context.Context, name, sock, id string) *exec.Cmd {
	out, err := os.Create(filepath.Join(*workDir, name+".vmm.out"))
	if err != nil {
		out = nil
	}
	b := firecracker.VMCommandBuilder{}.
		WithBin(*binPath).
		WithSocketPath(sock).
		AddArgs("--id", id, "--no-seccomp")
	if out != nil {
		b = b.WithStdout(out).WithStderr(out)
	}
	return b.Build(ctx)
}

func copyFile(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func bucket(size, refillMs int64) models.TokenBucket {
	return models.TokenBucket{Size: firecracker.Int64(size), RefillTime: firecracker.Int64(refillMs)}
}

func baseConfig(name, rootfs string) firecracker.Config {
	sock := filepath.Join(*workDir, name+".sock")
	os.Remove(sock)
	return firecracker.Config{
		SocketPath:      sock,
		KernelImagePath: *kernelPath,
		KernelArgs:      *bootArgs,
		Drives:          firecracker.NewDrivesBuilder(rootfs).Build(),
		MachineCfg: models.MachineConfiguration{
			VcpuCount:  firecracker.Int64(*vcpus),
			MemSizeMib: firecracker.Int64(*memMiB),
			Smt:        firecracker.Bool(false),
		},
		// What the SDK generates when VMID is empty; flick must take it as --id.
		VMID: uuid.New().String(),
	}
}

// newMachine builds a machine the README way and starts it.
func newMachine(ctx context.Context, name string, cfg firecracker.Config, opts ...firecracker.Opt) (*firecracker.Machine, error) {
	cmd := command(ctx, name, cfg.SocketPath, cfg.VMID)
	opts = append([]firecracker.Opt{firecracker.WithProcessRunner(cmd), firecracker.WithLogger(logger(name))}, opts...)
	return firecracker.NewMachine(ctx, cfg, opts...)
}

func stop(m *firecracker.Machine) {
	if m == nil {
		return
	}
	_ = m.StopVMM()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = m.Wait(ctx)
}

func nic(allowMMDS bool, limit bool) firecracker.NetworkInterface {
	n := firecracker.NetworkInterface{
		StaticConfiguration: &firecracker.StaticNetworkConfiguration{
			MacAddress:  "06:00:ac:10:00:02",
			HostDevName: *tapName,
		},
		AllowMMDS: allowMMDS,
	}
	if limit {
		n.InRateLimiter = firecracker.NewRateLimiter(bucket(10<<20, 100), bucket(1000, 100))
		n.OutRateLimiter = firecracker.NewRateLimiter(bucket(10<<20, 100), bucket(1000, 100))
	}
	return n
}

// readMetrics returns the metrics file's JSON lines.
func readMetrics(path string) ([]map[string]interface{}, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []map[string]interface{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var v map[string]interface{}
		if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
			return lines, fmt.Errorf("metrics line is not JSON: %v", err)
		}
		lines = append(lines, v)
	}
	return lines, sc.Err()
}

// Top-level keys of Firecracker's metrics JSON for a machine with a drive and
// a NIC (FirecrackerMetrics in Firecracker's src/vmm/src/logger/metrics.rs).
var metricsKeys = []string{"utc_timestamp_ms", "api_server", "block", "deprecated_api",
	"get_api_requests", "latencies_us", "logger", "mmds", "net", "patch_api_requests",
	"put_api_requests", "seccomp", "signals", "uart", "vcpu", "vmm"}

func checkMetricsSchema(lines []map[string]interface{}) error {
	if len(lines) == 0 {
		return errors.New("metrics file is empty")
	}
	last := lines[len(lines)-1]
	var missing []string
	for _, k := range metricsKeys {
		if _, ok := last[k]; !ok {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		var have []string
		for k := range last {
			have = append(have, k)
		}
		return fmt.Errorf("metrics JSON lacks Firecracker keys %v (has %v)", missing, have)
	}
	return nil
}

func waitExit(m *firecracker.Machine, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.Wait(ctx) }()
	select {
	case err := <-done:
		if ctx.Err() != nil {
			return fmt.Errorf("VMM still running %v after Ctrl+Alt+Del", d)
		}
		// Firecracker and flick exit 0 when the guest resets.
		if err != nil {
			return fmt.Errorf("VMM exited with %v", err)
		}
		return nil
	case <-time.After(d + time.Second):
		return fmt.Errorf("VMM still running %v after Ctrl+Alt+Del", d)
	}
}

func main() {
	flag.Parse()
	if *binPath == "" || *kernelPath == "" || *rootfsPath == "" || *workDir == "" {
		fmt.Fprintln(os.Stderr, "usage: sdk-acceptance -bin VMM -kernel K -rootfs R -workdir DIR [-tap TAP]")
		os.Exit(2)
	}
	ctx := context.Background()
	rootfs := filepath.Join(*workDir, "rootfs.img")
	if err := copyFile(rootfs, *rootfsPath); err != nil {
		fail("setup", err)
		os.Exit(1)
	}
	snapMem := filepath.Join(*workDir, "snap.mem")
	snapState := filepath.Join(*workDir, "snap.state")
	snapshotTaken := false

	if want("core") {
		snapshotTaken = core(ctx, rootfs, snapMem, snapState)
	}
	if want("restore") {
		if snapshotTaken {
			restore(ctx, rootfs, snapMem, snapState)
		} else {
			skip("restore", "no snapshot was created")
		}
	}
	if want("mmds") {
		mmds(ctx, rootfs)
	}
	if want("vsock") {
		vsock(ctx, rootfs)
	}
	if want("balloon") {
		balloon(ctx, rootfs)
	}
	if want("default-builder") {
		defaultBuilder(ctx, rootfs)
	}
	if want("stop") {
		stopVMM(ctx, rootfs)
	}
}

func core(ctx context.Context, rootfs, snapMem, snapState string) bool {
	cfg := baseConfig("core", rootfs)
	cfg.Drives = firecracker.NewDrivesBuilder(rootfs).
		WithRootDrive(rootfs, firecracker.WithRateLimiter(*firecracker.NewRateLimiter(bucket(64<<20, 100), bucket(10000, 100)))).
		Build()
	if *tapName != "" {
		cfg.NetworkInterfaces = firecracker.NetworkInterfaces{nic(false, true)}
	}
	cfg.LogFifo = filepath.Join(*workDir, "core.log.fifo")
	cfg.LogLevel = "Debug"
	logOut, _ := os.Create(filepath.Join(*workDir, "core.vmm.log"))
	cfg.FifoLogWriter = logOut
	cfg.MetricsPath = filepath.Join(*workDir, "core.metrics")
	os.Remove(cfg.LogFifo)
	os.Remove(cfg.MetricsPath)

	m, err := newMachine(ctx, "core", cfg)
	if !check("core/new-machine", err) {
		return false
	}
	defer stop(m)
	if !check("core/start", m.Start(ctx)) {
		return false
	}
	if v, err := m.GetFirecrackerVersion(ctx); err == nil {
		fmt.Printf("INFO version %s\n", v)
		pass("core/get-version")
	} else {
		fail("core/get-version", err)
	}
	if info, err := m.DescribeInstanceInfo(ctx); err == nil && info.State != nil && *info.State == "Running" {
		pass("core/describe-instance")
	} else if err == nil {
		fail("core/describe-instance", fmt.Errorf("state %v, want Running", derefs(info.State)))
	} else {
		fail("core/describe-instance", err)
	}
	if *bootWait > 0 {
		time.Sleep(*bootWait)
	}

	check("core/pause", m.PauseVM(ctx))
	if info, err := m.DescribeInstanceInfo(ctx); err != nil || info.State == nil || *info.State != "Paused" {
		fail("core/state-paused", fmt.Errorf("state %v err %v", derefs(info.State), err))
	} else {
		pass("core/state-paused")
	}
	check("core/resume", m.ResumeVM(ctx))

	// Swap the root drive's backing file (a copy), then set its rate limiter.
	swapped := filepath.Join(*workDir, "rootfs2.img")
	if err := copyFile(swapped, rootfs); err != nil {
		fail("core/update-guest-drive", err)
	} else {
		check("core/update-guest-drive", m.UpdateGuestDrive(ctx, "root_drive", swapped))
	}
	check("core/drive-rate-limiter-update", m.UpdateGuestDrive(ctx, "root_drive", swapped,
		func(p *ops.PatchGuestDriveByIDParams) {
			p.Body.RateLimiter = firecracker.NewRateLimiter(bucket(32<<20, 100), bucket(5000, 100))
		}))
	if *tapName != "" {
		check("core/nic-rate-limiter-update", m.UpdateGuestNetworkInterfaceRateLimit(ctx, "1",
			firecracker.RateLimiterSet{
				InRateLimiter:  firecracker.NewRateLimiter(bucket(1<<20, 100), bucket(100, 100)),
				OutRateLimiter: firecracker.NewRateLimiter(bucket(1<<20, 100), bucket(100, 100)),
			}))
	} else {
		skip("core/nic-rate-limiter-update", "no TAP")
	}

	// Metrics: Firecracker writes a line when metrics are configured and then
	// periodically; FlushMetrics writes one more.
	if lines, err := readMetrics(cfg.MetricsPath); err != nil {
		fail("core/metrics-before-flush", err)
	} else if len(lines) == 0 {
		fail("core/metrics-before-flush", errors.New("metrics file is empty after Start"))
	} else {
		pass("core/metrics-before-flush")
	}
	client := firecracker.NewClient(cfg.SocketPath, logger("core-client"), false)
	flush := models.InstanceActionInfoActionTypeFlushMetrics
	if _, err := client.CreateSyncAction(ctx, &models.InstanceActionInfo{ActionType: &flush}); err != nil {
		fail("core/flush-metrics", err)
	} else {
		pass("core/flush-metrics")
	}
	if lines, err := readMetrics(cfg.MetricsPath); err != nil {
		fail("core/metrics-schema", err)
	} else {
		check("core/metrics-schema", checkMetricsSchema(lines))
	}
	if fi, err := os.Stat(filepath.Join(*workDir, "core.vmm.log")); err != nil || fi.Size() == 0 {
		fail("core/log-fifo", fmt.Errorf("nothing read from the log FIFO (err %v)", err))
	} else {
		pass("core/log-fifo")
	}

	snapshotTaken := false
	if check("core/pause-for-snapshot", m.PauseVM(ctx)) {
		os.Remove(snapMem)
		os.Remove(snapState)
		snapshotTaken = check("core/create-snapshot", m.CreateSnapshot(ctx, snapMem, snapState))
		check("core/resume-after-snapshot", m.ResumeVM(ctx))
	}

	if check("core/shutdown-ctrl-alt-del", m.Shutdown(ctx)) {
		check("core/exit-after-ctrl-alt-del", waitExit(m, *shutdownWait))
	}
	return snapshotTaken
}

func restore(ctx context.Context, rootfs, snapMem, snapState string) {
	cfg := baseConfig("restore", rootfs)
	if *tapName != "" {
		cfg.NetworkInterfaces = firecracker.NetworkInterfaces{nic(false, true)}
	}
	m, err := newMachine(ctx, "restore", cfg, firecracker.WithSnapshot(snapMem, snapState,
		func(s *firecracker.SnapshotConfig) { s.ResumeVM = true }))
	if !check("restore/new-machine", err) {
		return
	}
	defer stop(m)
	if !check("restore/start-from-snapshot", m.Start(ctx)) {
		return
	}
	if info, err := m.DescribeInstanceInfo(ctx); err == nil && info.State != nil && *info.State == "Running" {
		pass("restore/state-running")
	} else if err == nil {
		fail("restore/state-running", fmt.Errorf("state %v, want Running", derefs(info.State)))
	} else {
		fail("restore/state-running", err)
	}
	check("restore/pause", m.PauseVM(ctx))
	check("restore/resume", m.ResumeVM(ctx))
}

func mmds(ctx context.Context, rootfs string) {
	if *tapName == "" {
		skip("mmds", "no TAP (MMDS needs a NIC)")
		return
	}
	cfg := baseConfig("mmds", rootfs)
	cfg.NetworkInterfaces = firecracker.NetworkInterfaces{nic(true, false)}
	cfg.MmdsVersion = firecracker.MMDSv2
	m, err := newMachine(ctx, "mmds", cfg)
	if !check("mmds/new-machine", err) {
		return
	}
	defer stop(m)
	if !check("mmds/start-with-mmds-nic", m.Start(ctx)) {
		return
	}
	data := map[string]interface{}{"latest": map[string]interface{}{"meta-data": map[string]interface{}{"ami-id": "ami-12345678", "hostname": "flick"}}}
	check("mmds/set-metadata", m.SetMetadata(ctx, data))
	var got map[string]interface{}
	if err := m.GetMetadata(ctx, &got); err != nil {
		fail("mmds/get-metadata", err)
	} else if !reflect.DeepEqual(normalize(got), normalize(data)) {
		fail("mmds/get-metadata", fmt.Errorf("got %v, want %v", got, data))
	} else {
		pass("mmds/get-metadata")
	}
	patch := map[string]interface{}{"latest": map[string]interface{}{"meta-data": map[string]interface{}{"hostname": "patched"}}}
	check("mmds/update-metadata", m.UpdateMetadata(ctx, patch))
	got = nil
	if err := m.GetMetadata(ctx, &got); err != nil {
		fail("mmds/get-after-update", err)
	} else {
		want := map[string]interface{}{"latest": map[string]interface{}{"meta-data": map[string]interface{}{"ami-id": "ami-12345678", "hostname": "patched"}}}
		if !reflect.DeepEqual(normalize(got), normalize(want)) {
			fail("mmds/get-after-update", fmt.Errorf("got %v, want %v", got, want))
		} else {
			pass("mmds/get-after-update")
		}
	}
}

// normalize round-trips v through JSON so maps compare by value.
func normalize(v interface{}) interface{} {
	b, _ := json.Marshal(v)
	var out interface{}
	_ = json.Unmarshal(b, &out)
	return out
}

func vsock(ctx context.Context, rootfs string) {
	cfg := baseConfig("vsock", rootfs)
	uds := filepath.Join(*workDir, "vsock.uds")
	os.Remove(uds)
	cfg.VsockDevices = []firecracker.VsockDevice{{ID: "vsock0", Path: uds, CID: 3}}
	m, err := newMachine(ctx, "vsock", cfg)
	if !check("vsock/new-machine", err) {
		return
	}
	defer stop(m)
	if !check("vsock/start-with-vsock", m.Start(ctx)) {
		return
	}
	// The host side of Firecracker's vsock: a unix socket that accepts
	// connections and reads "CONNECT <port>\n".
	c, err := net.DialTimeout("unix", uds, 2*time.Second)
	if err != nil {
		fail("vsock/uds-accepts", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte("CONNECT 1234\n")); err != nil {
		fail("vsock/uds-accepts", err)
		return
	}
	pass("vsock/uds-accepts")
}

func balloon(ctx context.Context, rootfs string) {
	cfg := baseConfig("balloon", rootfs)
	m, err := newMachine(ctx, "balloon", cfg)
	if !check("balloon/new-machine", err) {
		return
	}
	defer stop(m)
	// The README's way: a handler that runs CreateBalloon before InstanceStart.
	m.Handlers.FcInit = m.Handlers.FcInit.AppendAfter(firecracker.CreateMachineHandlerName,
		firecracker.NewCreateBalloonHandler(16, true, 1))
	if !check("balloon/start-with-balloon", m.Start(ctx)) {
		return
	}
	if b, err := m.GetBalloonConfig(ctx); err != nil {
		fail("balloon/get-config", err)
	} else if b.AmountMib == nil || *b.AmountMib != 16 {
		fail("balloon/get-config", fmt.Errorf("amount_mib %v, want 16", deref(b.AmountMib)))
	} else {
		pass("balloon/get-config")
	}
	check("balloon/update", m.UpdateBalloon(ctx, 32))
	if b, err := m.GetBalloonConfig(ctx); err != nil {
		fail("balloon/get-after-update", err)
	} else if b.AmountMib == nil || *b.AmountMib != 32 {
		fail("balloon/get-after-update", fmt.Errorf("amount_mib %v, want 32", deref(b.AmountMib)))
	} else {
		pass("balloon/get-after-update")
	}
	if s, err := m.GetBalloonStats(ctx); err != nil {
		fail("balloon/get-stats", err)
	} else if s.TargetMib == nil {
		fail("balloon/get-stats", errors.New("no target_mib"))
	} else {
		pass("balloon/get-stats")
	}
	check("balloon/update-stats-interval", m.UpdateBalloonStats(ctx, 2))
}

func deref(p *int64) interface{} {
	if p == nil {
		return nil
	}
	return *p
}

func derefs(p *string) interface{} {
	if p == nil {
		return nil
	}
	return *p
}

// defaultBuilder starts a machine without WithProcessRunner, so the SDK runs
// "firecracker" from PATH with its default arguments; the VMM's output, which
// that builder sends to this program's stdout, goes to a file instead.
func defaultBuilder(ctx context.Context, rootfs string) {
	dir := filepath.Join(*workDir, "path")
	os.RemoveAll(dir)
	bin, err := filepath.Abs(*binPath)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err == nil {
		err = os.Symlink(bin, filepath.Join(dir, "firecracker"))
	}
	if err == nil {
		err = os.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	}
	if !check("default-builder/firecracker-on-path", err) {
		return
	}
	cfg := baseConfig("default-builder", rootfs)
	cfg.VMID = ""
	m, err := firecracker.NewMachine(ctx, cfg, firecracker.WithLogger(logger("default-builder")))
	if !check("default-builder/new-machine", err) {
		return
	}
	defer stop(m)
	out, err := os.Create(filepath.Join(*workDir, "default-builder.vmm.out"))
	if err != nil {
		fail("default-builder/start", err)
		return
	}
	defer out.Close()
	// The child inherits fd 1 at Start: point it at the file for that call.
	saved, err := unix.Dup(1)
	if err == nil {
		err = unix.Dup2(int(out.Fd()), 1)
	}
	if err != nil {
		fail("default-builder/start", err)
		return
	}
	err = m.Start(ctx)
	_ = unix.Dup2(saved, 1)
	unix.Close(saved)
	if !check("default-builder/start", err) {
		return
	}
	if info, err := m.DescribeInstanceInfo(ctx); err != nil {
		fail("default-builder/instance-id", err)
	} else if info.ID == nil || *info.ID != m.Cfg.VMID {
		fail("default-builder/instance-id", fmt.Errorf("id %v, want the SDK's VMID %s", derefs(info.ID), m.Cfg.VMID))
	} else {
		pass("default-builder/instance-id")
	}
}

func stopVMM(ctx context.Context, rootfs string) {
	cfg := baseConfig("stop", rootfs)
	m, err := newMachine(ctx, "stop", cfg)
	if !check("stop/new-machine", err) {
		return
	}
	if !check("stop/start", m.Start(ctx)) {
		stop(m)
		return
	}
	check("stop/stop-vmm", m.StopVMM())
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err = m.Wait(wctx)
	if wctx.Err() != nil {
		fail("stop/exited", errors.New("VMM still running 5s after StopVMM"))
	} else {
		// StopVMM sends SIGTERM; Wait reports the signal, which is expected.
		_ = err
		pass("stop/exited")
	}
}
