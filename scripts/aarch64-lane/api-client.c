/*
 * A tiny HTTP/1.1 client for flick's API socket, for the aarch64 lane's L1 (busybox has none):
 *   api-client SOCKET METHOD PATH [JSON-BODY]
 * prints "<status> <body>" on one line; exits 0 when a response arrived, 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: api-client SOCKET METHOD PATH [BODY]\n");
		return 2;
	}
	const char *body = argc > 4 ? argv[4] : NULL;
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("api-client: connect");
		return 1;
	}
	char req[8192];
	int n;
	if (body)
		n = snprintf(req, sizeof(req),
			     "%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
			     "Content-Length: %zu\r\n\r\n%s",
			     argv[2], argv[3], strlen(body), body);
	else
		n = snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: localhost\r\n\r\n", argv[2],
			     argv[3]);
	if (n <= 0 || n >= (int)sizeof(req) || write(fd, req, (size_t)n) != n) {
		perror("api-client: write");
		return 1;
	}
	char resp[65536];
	size_t got = 0;
	/* Read until the headers and Content-Length bytes of body are in. */
	for (;;) {
		ssize_t r = read(fd, resp + got, sizeof(resp) - 1 - got);
		if (r <= 0)
			break;
		got += (size_t)r;
		resp[got] = 0;
		char *end = strstr(resp, "\r\n\r\n");
		if (!end)
			continue;
		char *cl = strstr(resp, "Content-Length:");
		if (!cl)
			cl = strstr(resp, "content-length:");
		size_t want = cl && cl < end ? strtoul(cl + 15, NULL, 10) : 0;
		if (got - (size_t)(end + 4 - resp) >= want)
			break;
	}
	resp[got] = 0;
	int status = 0;
	if (sscanf(resp, "HTTP/1.1 %d", &status) != 1) {
		fprintf(stderr, "api-client: no HTTP response\n");
		return 1;
	}
	char *b = strstr(resp, "\r\n\r\n");
	printf("%d %s\n", status, b ? b + 4 : "");
	return 0;
}
