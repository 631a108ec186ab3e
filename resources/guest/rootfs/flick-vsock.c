/*
 * flick-vsock: a small AF_VSOCK client and server for flick's Linux test guest.
 *
 *   flick-vsock connect CID PORT MESSAGE   connect, send MESSAGE and a newline, print
 *                                          every byte received until the peer closes
 *   flick-vsock listen PORT [COUNT]        accept COUNT (default 1) connections one after
 *                                          the other; answer each line with "echo: <line>"
 *                                          until the peer closes
 *
 * Prints "VSOCK <what>: <result>" lines for the test to match, and exits non-zero on any
 * failure with the failing call named.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what)
{
	printf("VSOCK error: %s: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int do_connect(unsigned cid, unsigned port, const char *message)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	char buf[4096];
	size_t total = 0;
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0)
		return fail("socket");
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("connect");
	if (write_all(fd, message, strlen(message)) < 0 || write_all(fd, "\n", 1) < 0)
		return fail("write");
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("read");
		}
		if (n == 0)
			break;
		fwrite(buf, 1, (size_t)n, stdout);
		total += (size_t)n;
	}
	printf("\nVSOCK received: %zu bytes\n", total);
	fflush(stdout);
	close(fd);
	return 0;
}

static int serve_one(int conn)
{
	char line[4096];
	size_t used = 0;

	for (;;) {
		ssize_t n = read(conn, line + used, sizeof(line) - used);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return fail("read");
		}
		if (n == 0)
			return 0;
		used += (size_t)n;
		char *nl;
		while ((nl = memchr(line, '\n', used))) {
			size_t len = (size_t)(nl - line) + 1;
			if (write_all(conn, "echo: ", 6) < 0 || write_all(conn, line, len) < 0)
				return fail("write");
			memmove(line, line + len, used - len);
			used -= len;
		}
		if (used == sizeof(line))
			used = 0;
	}
}

static int do_listen(unsigned port, unsigned count)
{
	struct sockaddr_vm addr = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

	if (fd < 0)
		return fail("socket");
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return fail("bind");
	if (listen(fd, 4) < 0)
		return fail("listen");
	printf("VSOCK listening: %u\n", port);
	fflush(stdout);
	for (unsigned i = 0; i < count; i++) {
		struct sockaddr_vm peer;
		socklen_t len = sizeof(peer);
		int conn = accept(fd, (struct sockaddr *)&peer, &len);
		if (conn < 0)
			return fail("accept");
		printf("VSOCK accepted: cid %u port %u\n", peer.svm_cid, peer.svm_port);
		fflush(stdout);
		if (serve_one(conn))
			return 1;
		close(conn);
	}
	printf("VSOCK done\n");
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "connect"))
		return do_connect((unsigned)strtoul(argv[2], NULL, 0), (unsigned)strtoul(argv[3], NULL, 0),
				  argv[4]);
	if ((argc == 3 || argc == 4) && !strcmp(argv[1], "listen"))
		return do_listen((unsigned)strtoul(argv[2], NULL, 0),
				 argc == 4 ? (unsigned)strtoul(argv[3], NULL, 0) : 1);
	fprintf(stderr, "usage: flick-vsock connect CID PORT MESSAGE | listen PORT [COUNT]\n");
	return 2;
}
