/*
 * Guest-side stall reporter for the inside-VM swap test (gcc -static -O2).
 *
 *   stallwatch PID SECONDS   every SECONDS, if the guest's pswpin + pswpout
 *                          have not moved, print the state, wait channel and
 *                          kernel stack of every thread of PID (the frontend),
 *                          then ask the kernel for its blocked tasks and
 *                          memory state (sysrq w and m) -- all to the console.
 *
 * It locks itself in memory and allocates nothing after that: it must keep
 * running when the swap device it watches is the thing that is stuck.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static char buf[65536];

static ssize_t slurp(const char *path)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	buf[n < 0 ? 0 : n] = '\0';
	return n;
}

static unsigned long long swapped(void)
{
	unsigned long long total = 0;
	if (slurp("/proc/vmstat") < 0)
		return 0;
	for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
		if (!strncmp(line, "pswpin ", 7) || !strncmp(line, "pswpout ", 8))
			total += strtoull(strchr(line, ' ') + 1, NULL, 10);
	}
	return total;
}

static void sysrq(char key)
{
	int fd = open("/proc/sysrq-trigger", O_WRONLY);
	if (fd >= 0) {
		(void)!write(fd, &key, 1);
		close(fd);
	}
}

static void dump(const char *pid)
{
	char path[512], dir[64];
	snprintf(dir, sizeof(dir), "/proc/%s/task", pid);
	DIR *d = opendir(dir);
	if (!d) {
		printf("STALLWATCH frontend %s is gone\n", pid);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s/stat", dir, e->d_name);
		if (slurp(path) > 0)
			printf("STALLWATCH thread %s", buf);
		snprintf(path, sizeof(path), "%s/%s/wchan", dir, e->d_name);
		if (slurp(path) >= 0)
			printf("STALLWATCH wchan %s\n", buf);
		snprintf(path, sizeof(path), "%s/%s/stack", dir, e->d_name);
		if (slurp(path) >= 0)
			printf("%s", buf);
	}
	closedir(d);
	fflush(stdout);
	sysrq('w');
	sysrq('m');
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: stallwatch PID SECONDS\n");
		return 2;
	}
	unsigned interval = (unsigned)atoi(argv[2]);
	if (mlockall(MCL_CURRENT | MCL_FUTURE) != 0)
		perror("stallwatch: mlockall");
	/* stdio's buffer and opendir's, allocated now while memory is plentiful */
	printf("STALLWATCH watching %s every %u s\n", argv[1], interval);
	fflush(stdout);
	closedir(opendir("/proc"));
	unsigned long long last = swapped();
	for (;;) {
		sleep(interval);
		unsigned long long now = swapped();
		if (now == last) {
			printf("STALLWATCH no swap I/O for %u s\n", interval);
			dump(argv[1]);
		}
		last = now;
	}
}
