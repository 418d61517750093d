/* dstack-key: ask the guest agent for a key over /var/run/dstack.sock and print its JSON answer.
 * The sample app's one dependency on dstack, in the few lines an app needs: an HTTP POST of
 * GetKey on a unix socket (what the dstack SDKs do). Built statically into the sample image. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "hello";
    const char *sock_path = getenv("DSTACK_SOCKET") ? getenv("DSTACK_SOCKET") : "/var/run/dstack.sock";
    char body[512], request[1024], answer[8192];
    int fd, n, total = 0;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};

    snprintf(body, sizeof body, "{\"path\":\"%s\",\"purpose\":\"sample-app\"}", path);
    snprintf(request, sizeof request,
             "POST /GetKey HTTP/1.0\r\nHost: dstack\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\n\r\n%s", strlen(body), body);
    strncpy(addr.sun_path, sock_path, sizeof addr.sun_path - 1);
    if ((fd = socket(AF_UNIX, SOCK_STREAM, 0)) < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror(sock_path);
        return 1;
    }
    if (write(fd, request, strlen(request)) < 0) {
        perror("write");
        return 1;
    }
    while ((n = read(fd, answer + total, sizeof answer - 1 - total)) > 0) total += n;
    answer[total] = 0;
    close(fd);
    char *json = strstr(answer, "\r\n\r\n");
    puts(json ? json + 4 : answer);
    return strstr(answer, " 200 ") ? 0 : 1;
}
