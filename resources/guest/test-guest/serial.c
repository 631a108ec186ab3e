/*
 * Polled 16550 UART, 8N1, no interrupts: COM1 (I/O port 0x3f8) on x86_64, the 8250 on MMIO at
 * 0x40002000 on arm64 (uart_in/uart_out in the arch header).
 */
#include "tg.h"

#define UART_RBR 0 /* receive buffer (read, DLAB=0) */
#define UART_THR 0 /* transmit holding (write, DLAB=0) */
#define UART_DLL 0 /* divisor latch low (DLAB=1) */
#define UART_IER 1 /* interrupt enable (DLAB=0) */
#define UART_DLM 1 /* divisor latch high (DLAB=1) */
#define UART_FCR 2 /* FIFO control (write) */
#define UART_IIR 2 /* interrupt identification (read) */
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5

#define LCR_8N1 0x03
#define LCR_DLAB 0x80
#define MCR_DTR_RTS 0x03
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

#define IIR_FIFO_ENABLED 0xc0
#define FIFO_SIZE 16

/* Bound on LSR polls, so that a UART that never drains cannot hang us. */
#define TX_POLL_LIMIT 100000

/*
 * Bytes that may still go to THR without another LSR poll: with the FIFOs on, THRE
 * means the whole 16-byte transmit FIFO is empty. Halves the port accesses per byte.
 */
static unsigned tx_burst = 1;
static unsigned tx_room;

void serial_init(void)
{
	uart_out(UART_IER, 0x00);	/* no interrupts */
	uart_out(UART_LCR, LCR_DLAB);
	uart_out(UART_DLL, 0x01);	/* 115200 baud */
	uart_out(UART_DLM, 0x00);
	uart_out(UART_LCR, LCR_8N1);
	uart_out(UART_FCR, 0x07);	/* FIFOs on and cleared */
	uart_out(UART_MCR, MCR_DTR_RTS);	/* no OUT2 (no IRQ), no loopback */
	tx_burst = (uart_in(UART_IIR) & IIR_FIFO_ENABLED) == IIR_FIFO_ENABLED ? FIFO_SIZE : 1;
	tx_room = 0;
}

void serial_putc(char c)
{
	if (tx_room == 0) {
		for (unsigned i = 0; i < TX_POLL_LIMIT; i++) {
			if (uart_in(UART_LSR) & LSR_THR_EMPTY)
				break;
			cpu_relax();
		}
		tx_room = tx_burst;
	}
	tx_room--;
	uart_out(UART_THR, (u8)c);
}

void serial_write(const char *s, size_t n)
{
	while (n--)
		serial_putc(*s++);
}

int serial_try_getc(void)
{
	if (uart_in(UART_LSR) & LSR_DATA_READY)
		return uart_in(UART_RBR);
	return -1;
}

u8 serial_getc(void)
{
	int c;
	while ((c = serial_try_getc()) < 0)
		cpu_relax();
	return (u8)c;
}
